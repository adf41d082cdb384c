"""Chat with the embedded default model (SmolLM2-135M-Instruct) on the CPU.

    python -m jaxdistill sample --config=experiments/sample/default.py
    python -m jaxdistill sample --config=experiments/sample/default.py \
        --config.model=gemma3-270m --config.prompt="Why is the sky blue?" --config.sample.temperature=0.7

`model` is a built-in name, a .gguf file or a Hugging Face directory.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "smollm2-135m-instruct"
    c.dtype = "float32"  # parameter dtype: float32 or bfloat16
    c.chat = True  # apply the model's chat template; False: plain completion
    c.system = ""  # optional system message
    c.prompt = "A farmer has 12 apples and gives away 5. How many are left? Answer briefly."
    c.sample = ml_collections.ConfigDict(
        dict(max_new_tokens=96, temperature=0.0, top_k=0, top_p=1.0, seed=0)  # temperature 0: greedy
    )
    return c
