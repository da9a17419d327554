#!/bin/bash
# Session 12: 2,000 more prompts (balanced order [8000, 10000)), same settings as session 10, by two workers.
cd /work/main && benchmarks/results/training_smollm2/distill/workers.sh runs/s12 8000:9000 9000:10000
