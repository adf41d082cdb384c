"""Where the student's own samples end: p(end of turn) under the student and under the stack target.

    python experiments/teachers/stack_end.py        # ~3 min on 2 cores

The self-distillation default's first 32 training problems; SmolLM2 samples its own answers
(temperature 0.7, 96 tokens, the chat prompt); at the last token of every answer that ends
with the end-of-turn token, it prints the student's probability of that token, the stack
target's (`arm=stack`: the three default teachers with the hint, top-10 candidates each,
mixture, top-20 renormalised) and each teacher's, and the target's top token there; once as
configured by default and once with `fewshot_ends_turn` (a few-shot teacher's end of reply, a blank
line or a line break after '#### N', counted as its end of turn).
"""
import numpy as np

from jaxdistill import sampling
from jaxdistill.data.synthetic import synthetic_records
from jaxdistill.models import load
from jaxdistill.prompts import student_messages
from jaxdistill.teachers import aggregate as agg
from jaxdistill.teachers.stack import TeacherConfig, TeacherStack, fewshot_block

model, tok = load("smollm2-135m-instruct")
gemma = load("gemma3-270m")
train = synthetic_records(96, 0, split="train")
records = train[:32]
prompts = [tok.chat(student_messages(r)) for r in records]
gen = sampling.generate(model, prompts, max_new_tokens=96, rule=sampling.Sample(0.7), rng=0,
                        eos_ids=[tok.turn_end_id, *tok.eos_ids], pad_id=tok.pad_id)
loaded = {"smollm2-135m-instruct": (model, tok), "gemma3-270m": gemma}
few = fewshot_block(train[:2])
teachers = [TeacherConfig("smollm2-chat", "smollm2-135m-instruct"),
            TeacherConfig("smollm2-fewshot", "smollm2-135m-instruct", style="fewshot"),
            TeacherConfig("gemma3-fewshot", "gemma3-270m", style="fewshot")]
ended = [r for r in range(len(records)) if gen.tokens[r, gen.lengths[r] - 1] == tok.turn_end_id]
comps = [gen.tokens[r, : gen.lengths[r]].tolist() for r in ended]
recs = [records[r] for r in ended]
end = tok.turn_end_id
print(f"{len(ended)} of {len(records)} samples end with the end-of-turn token")
for fewshot_ends_turn in (False, True):
    stack = TeacherStack(teachers, loaded=loaded, fewshot=few, hint=True, fewshot_ends_turn=fewshot_ends_turn)
    out = stack.score(recs, comps, aggregate=agg.MeanProbs(), top_k=10, record_top=20)
    rows = []
    for i, r in enumerate(ended):
        at = len(comps[i]) - 1
        student = float(np.exp(gen.logprobs[r, at]))
        ids, lps = out.top_ids[i, at], out.top_logprobs[i, at]
        target = float(np.exp(lps[ids == end][0])) if (ids == end).any() else 0.0
        each = np.exp(out.teacher_logprob[:, i, at])
        top = tok.decode([int(ids[0])])
        rows.append((student, target, *each, top))
    a = np.array([r[:5] for r in rows], float)
    student, target, chat, fewshot, gemma3 = a.mean(0)
    print(f"fewshot_ends_turn={fewshot_ends_turn}: mean p(end) at their end: student {student:.3f} | stack target "
          f"(top-20, renormalised) {target:.3f} | each teacher (within the stack's candidates): smollm2-chat "
          f"{chat:.3f}, smollm2-fewshot {fewshot:.3f}, gemma3-fewshot {gemma3:.3f}")
    print("  target's top token there:", {t: sum(1 for r in rows if r[5] == t) for t in {r[5] for r in rows}})
