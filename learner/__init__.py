"""DeepSpeed learner: SFT, GRPO, OPD, MOPD losses."""
