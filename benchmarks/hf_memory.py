"""Peak memory of a Hugging Face causal LM's loss on the CPU: its own head + loss vs the fused
head + loss that ``KernelSwap(fused_head=True)`` installs (the logits never exist).

Two measurements, each case in a fresh process (the peak resident memory, ``ru_maxrss``, is a
high-water mark of the whole process, so one process cannot measure two cases):

* ``head``: the loss alone. ``hidden [N, H]`` (given, requires grad) through an
  ``nn.Linear(H, V)`` head into transformers' ``ForCausalLMLoss``, forward and backward,
  against ``causal_lm_loss_from_hidden`` (``linear_cross_entropy``) on the same tensors.
* ``model``: one training step (forward + backward) of a tiny random Llama (hidden 64, 2
  blocks) with ``labels``, unswapped and with ``KernelSwap(fused_head=True)``.

The figure is the peak resident memory during the step minus the resident memory just before
it, in MiB. Before it, each case runs once on 8 tokens (one-time costs such as lazy imports and
the autograd engine's start are not the loss's), so the model, its gradients' buffers, the
inputs and the interpreter are in the baseline of both cases.

Run: python benchmarks/hf_memory.py [--vocab 32000 --tokens 4096 --hidden 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = ("head/plain", "head/fused", "model/plain", "model/fused")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _run_case(case: str, vocab: int, tokens: int, hidden: int) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.loss.loss_utils import ForCausalLMLoss

    from lightning_noise.functional.lm_head import FusedLMHead, causal_lm_loss_from_hidden

    torch.manual_seed(0)
    part, kind = case.split("/")
    seq = 512
    batch = max(1, tokens // seq)
    labels = torch.randint(0, vocab, (batch, seq))
    if part == "head":
        head = torch.nn.Linear(hidden, vocab, bias=False)

        def step(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if kind == "plain":
                loss = ForCausalLMLoss(head(h), y, vocab_size=vocab)
            else:
                loss = causal_lm_loss_from_hidden(h, head.weight, y, impl="torch")
            loss.backward()
            return loss

        # A warm-up on 8 tokens first: one-time costs (lazy imports, the autograd engine's
        # start) are not the loss's memory.
        step(torch.randn(1, 8, hidden, requires_grad=True), labels[:1, :8])
        h = torch.randn(batch, seq, hidden, requires_grad=True)
        before = _rss_mib()
        loss = step(h, labels)
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=seq,
        )
        model = LlamaForCausalLM(config).train()
        if kind == "fused":
            FusedLMHead(model, impl="torch")
        ids = labels.clone()
        model(input_ids=ids[:1, :8], labels=labels[:1, :8]).loss.backward()  # warm-up
        model.zero_grad(set_to_none=False)  # the gradients' memory is in the baseline
        before = _rss_mib()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
    return {"loss": float(loss), "peak_extra_mib": _peak_mib() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=4096, help="N = batch x 512 positions")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--no-csv", action="store_true", help="do not append to results.csv")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_run_case(args.case, args.vocab, args.tokens, args.hidden)))
        return
    results = {}
    for case in CASES:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                f"--case={case}",
                f"--vocab={args.vocab}",
                f"--tokens={args.tokens}",
                f"--hidden={args.hidden}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    n = max(1, args.tokens // 512) * 512
    logits_mib = n * args.vocab * 4 / 2**20
    print(
        f"N={n} tokens, V={args.vocab}, H={args.hidden}: "
        f"the float32 logits are {logits_mib:.0f} MiB"
    )
    print(f"{'case':<14}{'loss':>10}{'peak extra MiB':>17}")
    for case, r in results.items():
        print(f"{case:<14}{r['loss']:>10.4f}{r['peak_extra_mib']:>17.1f}")
    rows = []
    for part in ("head", "model"):
        plain, fused = results[f"{part}/plain"], results[f"{part}/fused"]
        ratio = fused["peak_extra_mib"] / plain["peak_extra_mib"]
        print(f"{part}: fused / plain = {ratio:.3f}")
        rows += [
            (f"{part}/plain/V{args.vocab}", "peak_extra_mib", plain["peak_extra_mib"]),
            (f"{part}/fused/V{args.vocab}", "peak_extra_mib", fused["peak_extra_mib"]),
            (f"{part}/V{args.vocab}", "fused_over_plain", ratio),
        ]
    if not args.no_csv:
        from common import append_results

        append_results("hf_memory", rows)


if __name__ == "__main__":
    main()
