"""Training steps with the GRUs through `avssl.models.rnn.gru` (one autograd node per layer on
CPU) against `nn.GRU` itself (packed clips for the heads), side by side in one process:

- a frozen-feature head step: LayerNorm + bidirectional GRU + linear on [32, 30, D] features
  (MFCC's D = 26, the tiny encoder's D = 64), as every frozen method's head trains;
- a scratch step: the tiny audio encoder (conv stack + 2-layer GRU) and the head, end to end.

    python benchmarks/gru_step.py [--threads 1] [--reps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save, table  # noqa: E402


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = what one Ray worker or evaluation task uses)")
    ap.add_argument("--reps", type=int, default=30, help="steps per timing (scratch steps: a third of it)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each side is reported")
    args = ap.parse_args()

    import torch

    import avssl.models.rnn as rnn
    from avssl.config import load_config
    from avssl.models.heads import DownstreamHead
    from avssl.models.pretrain import build_audio_encoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, t = 32, 30
    lengths, labels = torch.randint(20, t + 1, (b,)), torch.randint(0, 6, (b,))
    cases = {}
    for dim in (26, 64):
        head = DownstreamHead("gru", dim, 6, 32)
        feats = torch.randn(b, t, dim)
        opt = torch.optim.AdamW(head.parameters(), 1e-3)

        def head_step(head=head, feats=feats, opt=opt):
            loss = torch.nn.functional.cross_entropy(head(feats, lengths)[0], labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        cases[f"frozen head, D={dim}"] = (head_step, args.reps)
    enc = build_audio_encoder(load_config("quickstart").model.audio_encoder).train()
    head = DownstreamHead("gru", enc.out_dim, 6, 32)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), 1e-3)
    wave = torch.randn(b, int(1.2 * 16000)) * 0.1

    def scratch_step():
        loss = torch.nn.functional.cross_entropy(head(enc(wave), lengths)[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    cases["scratch (tiny encoder + head)"] = (scratch_step, max(3, args.reps // 3))
    fast = rnn.uses_fast_path
    times: dict[str, dict[str, list[float]]] = {name: {"nn.GRU": [], "gru": []} for name in cases}
    for _ in range(args.rounds):  # interleaved, so drift on a noisy machine hits both
        for name, (fn, reps) in cases.items():
            rnn.uses_fast_path = lambda module, x: False
            times[name]["nn.GRU"].append(timed(fn, reps))
            rnn.uses_fast_path = fast
            times[name]["gru"].append(timed(fn, reps))
    rows, results = [], []
    for name, t_ in times.items():
        ref, got = min(t_["nn.GRU"]), min(t_["gru"])
        rows.append([name, ref * 1e3, got * 1e3, ref / got])
        results.append({"case": name, "nn_gru_s": t_["nn.GRU"], "gru_s": t_["gru"]})
    print(table(f"Training step, batch 32, 1.2 s clips (30 frames), {args.threads} thread(s), best of {args.rounds} interleaved rounds",
                ["step", "nn.GRU ms", "gru ms", "speed-up"], rows))
    save("gru_step", {"threads": args.threads, "results": results}, "python benchmarks/gru_step.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
