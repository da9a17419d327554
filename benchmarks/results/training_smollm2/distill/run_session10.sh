#!/bin/bash
# Session 10: the training data lost with the previous machine, redistilled in bf16 (batch 64) by two workers.
# (`ONLY_DISTILL=1 scripts/train_smollm2_heads.sh` does the same.)
cd /work/main && benchmarks/results/training_smollm2/distill/workers.sh runs/s10 0:3000 3000:6000
