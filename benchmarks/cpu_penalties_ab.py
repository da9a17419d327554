"""Speculative decoding under repetition / presence / frequency penalties and bans, on the CPU, in one process: plain
decoding, Amphista with the heads' drafts ranked under the answer's penalties and the bias row (`ranked`, the default),
and Amphista with the heads' raw drafts (`raw`: SpeculativeDecoder._penalised_draft bypassed), each setting in turn,
question by question in rotating order. Every speculative answer is checked against plain decoding under the same
setting. The bans: every "," token (logit_bias -100), and " the" / " The" as bad_words.

    python benchmarks/cpu_penalties_ab.py [--trees mix-4] [--questions 16] [--max-new-tokens 128] [--settings A;B]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amphista_engine import Engine  # noqa: E402
from amphista_engine.speculative import SpeculativeDecoder  # noqa: E402
from benchmarks.common import ab_parser, first_turns, hardware, md_table, rotating_runs, write_results  # noqa: E402

SETTINGS = {"none": {}, "repetition 1.1": dict(repetition_penalty=1.1), "repetition 1.3": dict(repetition_penalty=1.3),
            "presence 0.8": dict(presence_penalty=0.8), "frequency 0.5": dict(frequency_penalty=0.5)}


def main():
    ap = ab_parser(__doc__)
    ap.add_argument("--settings", default=None, help="the settings to run, by name, ';'-separated (default: all)")
    args = ap.parse_args()
    tree = args.trees.split(",")[0]
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=1024)     # quant auto: 4-bit
    engine.load_heads("default")
    tok = engine.tokenizer
    commas = [i for i in range(engine.config.vocab_size) if tok.decode([i]).strip() == ","]
    SETTINGS["ban ',' (logit_bias)"] = dict(logit_bias={i: -100 for i in commas})
    SETTINGS["bad_words the"] = dict(bad_words=[" the", " The"])
    if args.settings:
        names = [n.strip() for n in args.settings.split(";")]
        if set(names) - set(SETTINGS):
            ap.error(f"unknown --settings {sorted(set(names) - set(SETTINGS))}; known: {list(SETTINGS)}")
        for name in list(SETTINGS):
            if name not in names:
                del SETTINGS[name]
    ranked = SpeculativeDecoder._penalised_draft

    def run(config, question):
        setting, arm = config
        SpeculativeDecoder._penalised_draft = ranked if arm == "ranked" else (lambda self, draft: draft)
        spec = arm != "plain"
        return engine.generate(question, max_new_tokens=args.max_new_tokens, speculative="amphista" if spec else None,
                               tree=tree if spec else None, **SETTINGS[setting])

    qs = first_turns(args.questions)
    engine.generate(qs[0], max_new_tokens=8)                                   # warm-up
    rows = []
    for setting in SETTINGS:
        configs = [(setting, "plain"), (setting, "ranked")] + ([(setting, "raw")] if setting != "none" else [])
        toks, secs, steps, outs = rotating_runs(qs, configs, run)
        for c in configs:
            same = sum(outs[c + (i,)] == outs[(setting, "plain", i)] for i in range(len(qs)))
            rows.append({"penalty": setting, "decoding": c[1] if c[1] == "plain" else f"amphista {tree}, {c[1]} drafts",
                         "tau": toks[c] / steps[c], "tok/s": toks[c] / secs[c], "equals plain": f"{same}/{len(qs)}"})
    SpeculativeDecoder._penalised_draft = ranked
    meta = {"hardware": hardware("cpu"), "questions": f"{len(qs)} MT-Bench first turns", "tree": tree,
            "max_new_tokens": args.max_new_tokens,
            "model": "smollm2-135m, 4-bit (quant auto), shipped Amphista heads, greedy"}
    table = md_table(rows, ["penalty", "decoding", "tau", "tok/s", "equals plain"])
    write_results("cpu_penalties_ab", rows, meta, table, args.out)


if __name__ == "__main__":
    main()
