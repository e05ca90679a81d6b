"""Process memory per token of the training data: the memory-mapped Arrow store against the
in-memory pandas frame the train stage used before it, with 1 and 2 ranks.

    python experiments/trajectory_memory.py                  # 20k trajectories, 11.5M tokens
    python experiments/trajectory_memory.py --trajectories 2000 --quick

A synthetic scores table (``--prompts`` × ``--k`` trajectories, prompts of ``--prompt-len``
tokens, completions of ``--min-len``..``--max-len`` tokens, ids drawn from Qwen2.5's
151,936-token vocabulary) is written as the score stage writes it. Then, each in fresh
processes (``--ranks`` of them at once, as the ranks of a node):

- **frame**: read the table into pandas and build the per-trajectory token lists, as the
  train stage did before the store (the frame stays referenced during training);
- **store**: :func:`disa.training.data.write_store` once, then every rank opens the store
  with :meth:`Trajectories.open` and reads every token of every trajectory.

Memory is the proportional set size (PSS, ``/proc/<pid>/smaps_rollup``): a page shared by
``r`` processes counts ``1/r`` in each, so PSS summed over the ranks is what the node holds.
Each figure is the rank's PSS after loading minus its PSS before (after the imports and a
small warm-up read, with all ranks started), divided by the tokens (prompt + completion,
every trajectory).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

VOCAB = 151_936


def smaps() -> dict[str, int]:
    """This process's ``Rss``, ``Pss``, ``Pss_Anon``, ``Pss_File`` in bytes."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def write_scores(
    path: Path, prompts: int, k: int, prompt_len: int, min_len: int, max_len: int, seed: int = 0
) -> int:
    """A scores.parquet of ``prompts × k`` trajectories, in row groups as the score stage
    writes them; returns the number of tokens (prompt + completion, every trajectory)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    tokens, writer = 0, None
    for start in range(0, prompts, 64):
        rows = []
        for p in range(start, min(start + 64, prompts)):
            prompt = rng.integers(0, VOCAB, prompt_len).tolist()
            for j in range(k):
                completion = rng.integers(
                    0, VOCAB, int(rng.integers(min_len, max_len + 1))
                ).tolist()
                tokens += len(prompt) + len(completion)
                rows.append(
                    {
                        "prompt_id": f"p{p}",
                        "component": "ref",
                        "sample_idx": j,
                        "prompt_ids": prompt,
                        "completion_ids": completion,
                        "text": "",
                        "finished": True,
                        "reward": float(rng.integers(0, 2)),
                        "logp_ref": -float(len(completion)),
                        "logq_ref": -float(len(completion)),
                        "n_tokens": len(completion),
                    }
                )
        table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return tokens


def frame_rank(scores: str, k: int, barrier, queue) -> None:
    """The train stage before the store: the whole table in pandas, the anchor's K per
    prompt selected and joined with log Ẑ, and the token lists of the dataset."""
    import gc

    import pandas as pd
    import pyarrow.parquet as pq
    import torch

    from disa.anchor import select_trajectories

    # warm-up: the lazily imported readers load now, not inside the measurement
    select_trajectories(pq.ParquetFile(scores).read_row_group(0).to_pandas(), 1, 0.0)
    gc.collect()
    barrier.wait()
    before = smaps()
    frame = pd.read_parquet(scores)
    traj, _ = select_trajectories(frame, k, 0.0)
    traj = traj.merge(
        pd.DataFrame({"prompt_id": traj.prompt_id.unique(), "log_z_hat": 0.5}), on="prompt_id"
    )
    del frame
    lists = (
        traj.prompt_ids.tolist(),
        traj.completion_ids.tolist(),
        {
            c: torch.tensor(traj[c].to_numpy(np.float64), dtype=torch.float32)
            for c in ("reward", "logp_ref", "log_z_hat")
        },
    )
    gc.collect()
    barrier.wait()
    after = smaps()
    queue.put({k_: after[k_] - before[k_] for k_ in after})
    barrier.wait()  # every rank measured while the others still hold theirs
    del lists, traj


def store_rank(store: str, barrier, queue) -> None:
    """A rank of the train stage now: the store memory-mapped, every token read."""
    import gc

    import pandas as pd

    from disa.training.data import Trajectories

    anchor = pd.Series(0.5, index=data_prompt_ids(store))
    warm = Trajectories.open(store, anchor)  # warm-up, as above; unmapped again when dropped
    warm.tokens(0)
    del warm
    gc.collect()
    barrier.wait()
    before = smaps()
    data = Trajectories.open(store, anchor)
    checksum = 0
    for i in range(len(data)):
        p, c = data.tokens(i)
        checksum += int(p.sum()) + int(c.sum())
    gc.collect()
    barrier.wait()
    after = smaps()
    queue.put({k_: after[k_] - before[k_] for k_ in after} | {"checksum": checksum})
    barrier.wait()
    del data


def data_prompt_ids(store: str):
    import pyarrow as pa

    return (
        pa.ipc.open_file(pa.memory_map(f"{store}/prompts.arrow"))
        .read_all()
        .column("prompt_id")
        .to_pylist()
    )


def measure(target, args: tuple, ranks: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(ranks), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, queue)) for _ in range(ranks)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join(timeout=600)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=1250)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=768)
    ap.add_argument("--ranks", default="1,2", help="numbers of ranks to measure, comma-separated")
    ap.add_argument("--quick", action="store_true", help="100 prompts (seconds)")
    ap.add_argument("--workdir", default="outputs/trajectory_memory")
    ap.add_argument("--out", default="outputs/trajectory_memory/memory.json")
    args = ap.parse_args()
    if args.quick:
        args.prompts = 100
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    scores = work / "scores.parquet"
    t0 = time.perf_counter()
    tokens = write_scores(scores, args.prompts, args.k, args.prompt_len, args.min_len, args.max_len)
    n = args.prompts * args.k
    print(
        f"scores table: {n:,} trajectories, {tokens:,} tokens, {scores.stat().st_size / 2**20:.0f} MiB parquet "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    from disa.training.data import write_store

    t0 = time.perf_counter()
    sizes = write_store(work / "store", scores, np.arange(n))
    on_disk = sum(p.stat().st_size for p in (work / "store").glob("*.arrow"))
    print(
        f"store: {on_disk / 2**20:.0f} MiB on disk ({on_disk / tokens:.2f} bytes/token; prompts stored once), "
        f"written in {time.perf_counter() - t0:.1f} s: {sizes}"
    )

    rows = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        for name, target, targs in (
            ("frame", frame_rank, (str(scores), args.k)),
            ("store", store_rank, (str(work / "store"),)),
        ):
            per_rank = measure(target, targs, ranks)
            pss = [r["Pss"] for r in per_rank]
            row = {
                "reader": name,
                "ranks": ranks,
                "tokens": tokens,
                "pss_bytes_per_token_per_rank": float(np.mean(pss)) / tokens,
                "pss_bytes_per_token_node": float(np.sum(pss)) / tokens,
                "rss_bytes_per_token_per_rank": float(np.mean([r["Rss"] for r in per_rank]))
                / tokens,
                "pss_anon_bytes_per_token_per_rank": float(
                    np.mean([r.get("Pss_Anon", 0) for r in per_rank])
                )
                / tokens,
                "pss_file_bytes_per_token_per_rank": float(
                    np.mean([r.get("Pss_File", 0) for r in per_rank])
                )
                / tokens,
            }
            rows.append(row)

    print(
        "\n| reader | ranks | PSS B/token per rank | PSS B/token, node | RSS B/token per rank | anon / file PSS B/token per rank |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['reader']} | {r['ranks']} | {r['pss_bytes_per_token_per_rank']:.2f} | "
            f"{r['pss_bytes_per_token_node']:.2f} | {r['rss_bytes_per_token_per_rank']:.2f} | "
            f"{r['pss_anon_bytes_per_token_per_rank']:.2f} / {r['pss_file_bytes_per_token_per_rank']:.2f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "args": vars(args),
                "tokens": tokens,
                "trajectories": n,
                "store_bytes": on_disk,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
