"""The scripts' run plumbing, shared by from_scratch/ and offline_to_online/; nothing here is part of an algorithm.

cli            the run options every script's Args has, --resume's saved args, the checks of the command line
runs           run directory, lock, args.json, metrics.csv and wandb; stop signals, divergence stop, console progress
checkpoints    checkpoint.flax and --resume (the offline-to-online phases too), --save-model
gym_tasks      gymnasium environments, their evaluation, and the MuJoCo state that lets a resumed episode go on
ogbench_tasks  OGBench names, environments, datasets, evaluation of action chunks, and their environment state
batching       several seeds in one jitted call, and the random phase's transitions written in blocks
"""
