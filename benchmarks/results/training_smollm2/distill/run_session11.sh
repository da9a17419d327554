#!/bin/bash
# Session 11: 2,000 more prompts (balanced order [6000, 8000)), same settings as session 10, by two workers.
cd /work/main && benchmarks/results/training_smollm2/distill/workers.sh runs/s11 6000:7000 7000:8000
