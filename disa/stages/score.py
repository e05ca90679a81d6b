"""Stage 2, score: reward, ``log π_ref`` and ``log q_c`` under every component, per trajectory."""

from __future__ import annotations

import numpy as np
import pandas as pd

from disa import anchor as anchoring
from disa.cache import Artifact, atomic_writer
from disa.sampling import SamplerSettings
from disa.stages.context import Context, shards
from disa.tokenization import load_tokenizer

#: trajectories per shard of the score stage (a resume point), in scoring batches
SHARD_BATCHES = 8


def run(ctx: Context, rollouts: dict[str, Artifact]) -> Artifact:
    """One table of every trajectory with ``reward``, ``logp_ref`` and ``logq_<component>``:
    the density each component *sampled* it with (temperature, top-k, top-p included).

    The executor's workers fill one shard per column and piece of the trajectories (a
    piece is ``scoring.batch_size × SHARD_BATCHES`` of them); this job then seals the table
    piece by piece, so no process ever holds every trajectory in memory."""
    sampling = SamplerSettings.from_cfg(ctx.cfg.sampler)
    spec = {
        "rollouts": {c: a.key for c, a in rollouts.items()},
        "task": ctx.task.spec(),
        "scorers": {c: ctx.fingerprint(c) for c in ["ref", *ctx.settings.components]},
        "dtype": ctx.backbone.dtype,
        "sampler": sampling.spec(),
    }

    def build(art: Artifact) -> dict:
        rows = RolloutRows(rollouts)
        ctx.fill(art, fill, units(ctx, rows.n), rollouts)
        return seal(ctx, art, rows)

    art = ctx.build("score", spec, build)
    # Checked on a reused artifact too, and outside its key: a changed tolerance re-checks
    # without re-scoring.
    check_sampler_agreement(
        art.manifest().get("sampler_agreement", {}), ctx.cfg.sampler.get("logprob_tolerance")
    )
    return art


def passes(ctx: Context) -> list[tuple[str | None, str, SamplerSettings | None]]:
    """``(model component, column, density settings)`` of each column the stage computes, in
    order: the reward (no model), ``log π_ref`` under the model's own density, then each
    sampled component's density *as sampled* (π_ref's is ``logp_ref`` itself when the
    sampler does not change it)."""
    sampling = SamplerSettings.from_cfg(ctx.cfg.sampler)
    out = [
        (None, "reward", None),
        ("ref", "logp_ref", SamplerSettings(max_new_tokens=sampling.max_new_tokens)),
    ]
    for comp in ctx.settings.components:
        if not (comp == "ref" and sampling.is_identity):
            out.append((comp, f"logq_{comp}", sampling))
    return out


def pieces(ctx: Context, n: int) -> list[range]:
    return shards(n, ctx.settings.score_batch_size * SHARD_BATCHES)


def units(ctx: Context, n: int) -> list[tuple[str, int]]:
    """Every shard of the stage, grouped by column so that a worker loads each model once."""
    return [(column, i) for _, column, _ in passes(ctx) for i in range(len(pieces(ctx, n)))]


def fill(ctx: Context, art: Artifact, rollouts: dict[str, Artifact]) -> int:
    """Write the missing shards of the stage, together with any other workers: each reads
    only the trajectories of its pieces, and loads a model only when it scores with it."""
    rows = RolloutRows(rollouts, verify=False)  # the job verified them before starting the workers
    cut = pieces(ctx, rows.n)
    plan = {column: (comp, how) for comp, column, how in passes(ctx)}
    loaded: dict = {}

    def make(column: str, i: int) -> pd.DataFrame:
        part = rows.read(cut[i].start, cut[i].stop)
        comp, how = plan[column]
        if comp is None:  # refused before it is cached: a fixed verifier then rewards again
            # checked numbers
            reward = ctx.rewards()(ctx.prompt_rows(part.prompt_id), part.text.tolist())
            anchoring.check_finite(
                pd.DataFrame({"prompt_id": part.prompt_id.to_numpy(), "reward": reward}), ["reward"]
            )
            return pd.DataFrame({"reward": reward})
        if loaded.get("comp") != comp:  # one model in memory at a time
            loaded.clear()
            loaded.update(
                comp=comp, model=ctx.load_model(comp), tok=load_tokenizer(ctx.backbone.ref_path)
            )
        lp = _score(
            ctx,
            loaded["model"],
            loaded["tok"],
            part,
            how,
            desc=f"score {column} {i + 1}/{len(cut)}",
        )
        return pd.DataFrame({column: lp})

    return art.fill_shards(units(ctx, rows.n), make)


def seal(ctx: Context, art: Artifact, rows: RolloutRows) -> dict:
    """Join the trajectories with their scored columns into ``scores.parquet``, one row group
    per piece, after checking every value is finite; drop the shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cut = pieces(ctx, rows.n)
    columns = {
        column: np.concatenate(
            [art.read_shard(i, prefix=column)[column].to_numpy() for i in range(len(cut))]
        )
        for _, column, _ in passes(ctx)
    }
    if "logq_ref" not in columns and "ref" in ctx.settings.components:
        columns["logq_ref"] = columns["logp_ref"]
    small = rows.small_columns().assign(**columns)  # one row per trajectory, no tokens
    anchoring.check_finite(small, ["reward", "logp_ref"])
    with atomic_writer(art.path / "scores.parquet") as tmp:
        writer = None
        try:
            for r in cut:
                part = rows.read(r.start, r.stop)
                for column, values in columns.items():
                    part[column] = values[r.start : r.stop]
                part["n_tokens"] = small.n_tokens.to_numpy()[r.start : r.stop]
                table = pa.Table.from_pandas(
                    part, preserve_index=False, schema=writer.schema if writer else None
                )
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    art.remove_shards()
    return {"rows": rows.n, "sampler_agreement": sampler_agreement(small)}


class RolloutRows:
    """The trajectories of the rollout artifacts (each component's, in order) as one row
    range, read a piece at a time from the shards it falls in."""

    def __init__(self, rollouts: dict[str, Artifact], verify: bool = True):
        self.files = [f for a in rollouts.values() for f in a.shard_files(verify=verify)]
        self.starts = np.cumsum([0, *(rows for _, rows in self.files)])
        self.n = int(self.starts[-1])
        self._last: tuple[int, pd.DataFrame] | None = None

    def _file(self, j: int) -> pd.DataFrame:
        if self._last is None or self._last[0] != j:  # consecutive pieces mostly share a file
            self._last = (j, pd.read_parquet(self.files[j][0]))
        return self._last[1]

    def read(self, start: int, stop: int) -> pd.DataFrame:
        """Rows ``[start, stop)``."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        for j in range(first, len(self.files)):
            if self.starts[j] >= stop:
                break
            lo, hi = max(start - self.starts[j], 0), min(stop, self.starts[j + 1]) - self.starts[j]
            parts.append(self._file(j).iloc[lo:hi])
        return pd.concat(parts, ignore_index=True)

    def small_columns(self) -> pd.DataFrame:
        """``prompt_id``, ``component``, ``n_tokens`` (and the engine's own ``sampler_logprob``
        where it reported one) of every trajectory, without reading the token lists."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        frames = []
        for path, _ in self.files:
            names = pq.read_schema(path).names
            keep = [c for c in ("prompt_id", "component", "sampler_logprob") if c in names]
            df = pd.read_parquet(path, columns=keep)
            lengths = pc.list_value_length(
                pq.read_table(path, columns=["completion_ids"]).column(0)
            )
            frames.append(df.assign(n_tokens=lengths.to_numpy().astype(np.int64)))
        return pd.concat(frames, ignore_index=True)


def _score(
    ctx: Context, model, tok, part: pd.DataFrame, how: SamplerSettings, desc: str
) -> np.ndarray:
    from disa.scoring import sequence_logprobs

    return sequence_logprobs(
        model,
        part.prompt_ids.tolist(),
        part.completion_ids.tolist(),
        tok.pad_token_id,
        batch_size=ctx.settings.score_batch_size,
        temperature=how.temperature,
        top_k=how.top_k,
        top_p=how.top_p,
        chunk_size=ctx.settings.chunk_size,
        progress=desc,
    ).numpy()


def sampler_agreement(scores: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per component, how far the sampling engine's own log-probs (``sampler_logprob``, where
    the engine reported them) are from the harness's scored ``logq_<component>``: the one
    source of truth for weights and losses is the scorer, and a large gap means the engine
    sampled from another model than the one scored (dtype, kernels, another checkpoint).
    Components without any reported value are left out, unless the scorer gives some of
    their samples probability 0 (``scorer_impossible``, then the gaps are NaN), so that the
    tolerance check sees them."""
    from disa.sampling.vllm import logprob_agreement

    if "sampler_logprob" not in scores:
        return {}
    out = {}
    for comp, g in scores.groupby("component", sort=True):
        agreement = logprob_agreement(g.sampler_logprob, g[f"logq_{comp}"], g.n_tokens)
        if agreement["compared"] > 0 or agreement["scorer_impossible"] > 0:
            out[str(comp)] = agreement
    return out


def check_sampler_agreement(agreement: dict[str, dict[str, float]], tolerance) -> None:
    """Refuse (``LogprobMismatch``) the scores of an engine whose own log-probs are further
    from the scorer's than ``sampler.logprob_tolerance`` nats per token (``None``: report
    only), naming the component, the measured gap and the tolerance."""
    from disa.sampling.vllm import check_agreement

    check_agreement(agreement, None if tolerance is None else float(tolerance))


def report(ctx: Context, scores: Artifact) -> dict:
    out = {"artifact.score": scores.key}
    for comp, agreement in scores.manifest().get("sampler_agreement", {}).items():
        out |= {f"score.sampler_{k}.{comp}": v for k, v in agreement.items()}
    return out
