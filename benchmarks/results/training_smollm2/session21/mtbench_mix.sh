# Sourced by run_session21.sh and session35/run_dynamic_tau.sh (from the repo root): the distilled shards the
# trees are fitted on (DATA, under D) and the held-out source weights for MT-Bench's category mix (MIX).
D=benchmarks/results/training_smollm2/distill
DATA=""
for s in 0 3000 6000 7000 8000 9000 10000 11000 12000 13000; do DATA="$DATA $D/distill-$s.jsonl.gz"; done
# MT-Bench has 8 categories of 10 questions. By analogy of kind (never from its questions): coding -> the code
# sources, math -> gsm8k, roleplay -> gpteacher_roleplay, extraction -> t0_p3 (short task answers), and writing,
# reasoning, stem, humanities -> the general-instruction sources. Each group gets its categories' share of the
# held-out answer positions (code 1/8, math 1/8, roleplay 1/8, t0 1/8, general 4/8): the weights below are those
# shares over the groups' held-out position counts (code 42,929; gsm8k 18,005; roleplay 25,386; t0 10,788;
# general 16,045), relative to code's.
G=10.7
MIX=alpaca_en_demo=$G,truthfulqa=$G,wizardlm_testset=$G,selfinstruct_seed=$G,vicuna_bench=$G,fastchat_dummy=$G
MIX=$MIX,t0_p3=3.98,gpteacher_roleplay=1.69,gsm8k_train=2.38
