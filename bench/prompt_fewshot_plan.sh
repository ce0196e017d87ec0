#!/bin/sh
# The order issue 8's table was run in on a 2-core CPU: shard $1 of 2 (run `sh bench/prompt_fewshot_plan.sh 0`
# and `... 1` side by side). Cheap, decisive cells first; a rerun skips finished cells.
set -e
B="env PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/prompt_fewshot.py --out ${OUT:-runs/bench-prompt} --shard $1/2"
$B --tasks sst2,rte --rows zero-shot,zero-shot-calibrated
$B --tasks sst2 --ks 16 --rows linear-lora,linear-full,verbalizer-lora,verbalizer-prompt,verbalizer-prefix,pet
$B --tasks rte --ks 16 --rows linear-lora,verbalizer-lora,verbalizer-prompt,verbalizer-prefix,pet
$B --tasks sst2 --ks 64 --rows linear-lora,linear-full,verbalizer-lora,verbalizer-prompt,verbalizer-prefix,pet
$B --tasks sst2 --ks 16 --rows ipet
$B --tasks rte --ks 64 --rows linear-lora,verbalizer-lora,verbalizer-prompt,verbalizer-prefix,pet,linear-full
$B --tasks rte --ks 16 --rows linear-full,ipet
