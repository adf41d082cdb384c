import sys

from jaxdistill.main import main

sys.exit(main())
