"""`python -m lab.compile_ab [--passes 8]`: compiled resident against compiled `patched-1.0`, side by side.

`make bench` runs its rows minutes apart, so on a shared machine drift between two rows can look like a cost. Here
two instances of the Mixtral-shaped reference model, one compiled as users compile it and one patched at budget 1.0
with `compile=True`, decode the same held-out text through a static KV cache in alternating passes.
"""

from __future__ import annotations

import argparse
import statistics

from transformers import AutoModelForCausalLM, AutoTokenizer

from lab import offload_bench as ob
from offload_moe.patch import patch
from tests.corpus import corpus_text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=8)
    args = ap.parse_args(argv)
    path = ob.MODELS["mixtral"]
    tok = AutoTokenizer.from_pretrained(path)
    text = corpus_text("val", max_bytes=600)
    prompts = [tok(corpus_text("val", max_bytes=4000), return_tensors="pt")["input_ids"][:, :128]]
    resident, patched = (AutoModelForCausalLM.from_pretrained(path, dtype=ob.DTYPE).eval() for _ in range(2))
    handle = patch(patched, budget=1.0, device="cpu", compile=True)
    speeds: dict[str, list[float]] = {"resident": [], "patched-1.0": []}
    with ob.compiled_forward(resident):
        ob.warm_up(resident, prompts)
        ob.warm_up(patched, prompts)
        order = [("resident", resident), ("patched-1.0", patched)]
        for i in range(args.passes):
            for name, model in order if i % 2 == 0 else order[::-1]:  # alternating: drift hits both alike
                speeds[name].append(ob.decode_speed_and_bpb(model, tok, text, static=True)[0])
    handle.unpatch()
    for name, s in speeds.items():
        print(f"{name:<12} decode tok/s per pass: {', '.join(f'{x:.0f}' for x in s)}")
    ratio = statistics.median(speeds["patched-1.0"]) / statistics.median(speeds["resident"])
    print(f"patched-1.0 compiled x compiled resident (medians): {ratio:.3f}")


if __name__ == "__main__":
    main()
