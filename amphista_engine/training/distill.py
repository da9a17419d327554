"""`amphista distill`: the target answers training prompts (greedy, chat template, batched); answers go to a shard."""
from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

from ..errors import InputError
from ..text_files import check_out_path, user_path
from .data import SAMPLE_SEP, Prompt, ShardWriter, prompt_digest, read_prompts


def distill(prompts_file, out, model: str = "smollm2-135m", limit: int | None = None, offset: int = 0,
            batch_size: int = 8,
            max_new_tokens: int = 256, balance_by_source: bool = False, seed: int = 0, device=None, dtype=None,
            max_seq_len: int = 1024, engine=None, progress: bool = True, sources: str | list | None = None,
            samples: int = 1, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """Generates the missing records of `out` (resumable: ids already there are skipped) for prompts
    [offset, limit) of the (balanced) prompt order. Returns counts.

    sources: keep only these prompt sources (after balancing and the offset/limit window). samples > 1 (needs a
    temperature > 0) writes that many sampled answers per prompt, ids `ID#s0`, `ID#s1`, ...: more contexts for the
    sources a prompt file has few of. The trainer's held-out split hashes the id before '#', so the answers of one
    prompt never straddle it."""
    from tqdm import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise InputError("--batch-size and --max-new-tokens must be positive")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be a positive integer, got {limit}")
    # finite, and 0 or at least the sampler's smallest divisor: inf, nan and 1e-30 were refused only after the
    # load, in the sampler's words ("temperature must be ...", no flag)
    from ..sampling import MIN_DIVISOR
    if not (temperature == 0 or MIN_DIVISOR <= temperature < float("inf")):
        raise InputError(f"--temperature must be 0 (greedy answers) or a finite number of at least {MIN_DIVISOR}, "
                         f"got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {top_p}")
    if offset < 0:
        raise InputError("--offset must be >= 0")
    prompts_file, out = user_path(prompts_file), user_path(out)
    if str(out).endswith(".gz"):        # records are appended line by line, fsynced: a gzip stream cannot be
        raise InputError(f"--out {out}: distill writes plain JSONL (appended and fsynced record by record); "
                         f"name it .jsonl and gzip it when it is complete (train reads .jsonl.gz)")
    if Path(out).is_dir():
        raise InputError(f"--out {out} is a directory; give the JSONL shard file to write (or resume)")
    check_out_path("--out", out, folder=False)
    _check_shard_file(out)
    if samples < 1 or (samples > 1 and temperature <= 0):
        raise InputError(f"--samples {samples}: need samples >= 1, and a --temperature > 0 for more than one "
                         f"(greedy answers to one prompt are all the same)")
    cache_len = engine.max_seq_len if engine is not None else max_seq_len
    if cache_len < 2:
        raise InputError(f"--max-seq-len must be at least 2 (a prompt token and an answer token), got {cache_len}")
    if max_new_tokens >= cache_len:
        raise InputError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the cache "
                         f"(--max-seq-len {cache_len}): every prompt would be skipped; raise --max-seq-len or lower "
                         f"--max-new-tokens")
    prompts = read_prompts(prompts_file, limit=limit, balance_by_source=balance_by_source, seed=seed)
    # A second worker (its own shard) starts deep in the same balanced order; the two shards train together.
    if offset and offset >= len(prompts):
        raise InputError(f"--offset {offset} is past the {len(prompts)} prompts of {prompts_file}"
                         + (f" taken by --limit {limit}" if limit is not None else "") + ": nothing to distill")
    prompts = prompts[offset:]
    if sources:
        keep = {s.strip() for s in (sources.split(",") if isinstance(sources, str) else sources)} - {""}
        if not keep:      # `--sources ,` kept no prompt, and distill wrote nothing while reporting success
            raise InputError(f"--sources {sources!r} names no source; give a comma list of prompt sources, e.g. "
                             f"{','.join(sorted({p.source for p in prompts})[:3])}")
        unknown = sorted(keep - {p.source for p in prompts})
        if unknown:
            raise InputError(f"--sources: no prompts of {', '.join(unknown)} in that window of {prompts_file}; "
                             f"its sources: {', '.join(sorted({p.source for p in prompts}))}")
        prompts = [p for p in prompts if p.source in keep]
    if samples > 1:
        prompts = [Prompt(f"{p.id}{SAMPLE_SEP}s{k}", p.source, p.prompt) for p in prompts for k in range(samples)]
    if engine is None:
        from ..engine import Engine
        # quant none: the committed training data came from the dequantized weights, and rebuilding it must too
        engine = Engine.from_pretrained(model, device=device, dtype=dtype, max_seq_len=max_seq_len,
                                        max_batch_size=batch_size, quant="none")
    counts = {"prompts": len(prompts), "done_before": 0, "written": 0, "skipped_too_long": 0,
              "answer_tokens": 0, "seconds": 0.0}
    from ..heads import lm_head_fingerprint
    fp = lm_head_fingerprint(engine.model)
    with ShardWriter(out) as shard:
        other = sorted(shard.max_new_tokens - {max_new_tokens})
        if other:        # a resumed shard must not mix answer budgets: its records would train unlike each other
            raise InputError(f"{out} holds answers written with --max-new-tokens {', '.join(map(str, other))}; this "
                             f"run asks for {max_new_tokens}: use that setting to resume, or another --out")
        others = sorted(shard.targets - {fp})
        if others:       # nor targets: one shard's ids must all mean the same tokens
            raise InputError(f"{out} holds answers of another target (LM-head fingerprint {', '.join(others)}; "
                             f"this model's is {fp}): use that --model to resume, or another --out")
        # An id already answered for another prompt text: a second prompt file whose ids collide with the first's
        # (ShareGPT items without an 'id' are sharegpt-N in every file), or an edited prompt. Skipping it as done
        # would leave that prompt unanswered while the summary counts it as answered.
        clash = [p for p in prompts if shard.prompts.get(p.id, prompt_digest(p.prompt)) != prompt_digest(p.prompt)]
        if clash:
            raise InputError(f"{out} already answers {len(clash)} of these prompt id(s) for another prompt text "
                             f"(first: id {clash[0].id!r}, here {clash[0].prompt[:60]!r}): the ids of two prompt files "
                             f"collide, or the prompts were edited; give the prompts ids unique across files (ShareGPT "
                             f"items without an 'id' are numbered sharegpt-N in every file), or distill into another "
                             f"--out")
        todo = [p for p in prompts if p.id not in shard.ids]
        counts["done_before"] = len(prompts) - len(todo)
        if shard.bad_lines:
            print(f"distill: warning: {shard.bad_lines} unreadable line(s) in {out} are kept as they are",
                  file=sys.stderr)
        t0, room = time.perf_counter(), engine.max_seq_len - max_new_tokens
        queue = []
        for p in todo:       # encode once to drop prompts that cannot fit, with a counted skip
            ids = engine.encode_prompt(p.prompt)
            if len(ids) > room:
                counts["skipped_too_long"] += 1
                continue
            queue.append((p, ids))
        if todo and not queue and not counts["done_before"]:
            # a shard of no record "succeeded" (exit 0), and train then met an empty file
            raise InputError(f"all {len(todo)} prompts are longer than the {room} tokens the cache leaves them "
                             f"(--max-seq-len {engine.max_seq_len} less --max-new-tokens {max_new_tokens}): nothing "
                             "to distill; raise --max-seq-len or lower --max-new-tokens")
        # after the skips: an error above is not written onto the bar's line
        bar = tqdm(total=len(prompts), initial=counts["done_before"] + counts["skipped_too_long"], unit="prompt",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True, desc="distill")
        # A batch prefills right-padded to its longest prompt (on a CPU, 64 mixed prompts cost ~9x their own
        # tokens): sorting by length makes batches of alike lengths. Sorting only within windows of 16 batches
        # keeps the records of a stopped run source-balanced at that grain.
        window = 16 * batch_size
        for w in range(0, len(queue), window):
            queue[w:w + window] = sorted(queue[w:w + window], key=lambda e: len(e[1]))
        sampling = {} if temperature <= 0 else {"temperature": temperature, "top_p": top_p}
        for i in range(0, len(queue), batch_size):
            batch = queue[i:i + batch_size]
            # sampled runs: one seed per batch, from the ids of its records, so batches of a resumed run (which
            # start elsewhere) draw afresh instead of replaying the first batches' draws
            rng_seed = {"seed": zlib.crc32(f"{seed}:{batch[0][0].id}:{batch[-1][0].id}".encode())} if sampling else {}
            results = engine.generate_batch([p.prompt for p, _ in batch], max_new_tokens=max_new_tokens,
                                            **sampling, **rng_seed)
            for (p, ids), r in zip(batch, results):
                rec = {"id": p.id, "source": p.source, "prompt": p.prompt, "prompt_ids": r.prompt_token_ids,
                       "answer_ids": r.token_ids, "answer": r.text, "finish_reason": r.finish_reason,
                       "max_new_tokens": max_new_tokens, "target_fingerprint": fp}
                shard.write({**rec, **sampling})
                counts["written"] += 1
                counts["answer_tokens"] += len(r.token_ids)
            dt = time.perf_counter() - t0
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{counts['answer_tokens'] / dt:.1f}", tokens=counts["answer_tokens"])
        bar.close()
        counts["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"distill: {counts['written']} new records ({counts['answer_tokens']} answer tokens, "
          f"{counts['seconds']} s), {counts['done_before']} already in {out}, "
          f"{counts['skipped_too_long']} prompts skipped as too long", file=sys.stderr)
    return counts


def _check_shard_file(out):
    """An existing --out must be a shard distill wrote (or its torn start): it is appended to, and its bytes after
    the last newline are cut as a torn record. A model file, a tarball or notes given by a slip lost their tail
    and took JSON lines, with only "N unreadable line(s) are kept" said about it."""
    path = Path(out)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    lines = head.split(b"\n")
    complete = lines[:-1]
    ours = False
    for line in complete:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            ours = True
            break
    if not complete:        # one record being written when the run was killed
        ours = head.lstrip().startswith(b"{")
    if b"\0" in head or not ours:
        raise InputError(f"--out {out} exists and is not a distill shard (JSONL answer records): distill appends to "
                         f"it and cuts what follows its last newline, which would damage it; give a new file or a "
                         f"shard distill wrote")
