"""HART training: stages, the DeepSpeed runtime, checkpoints, the HART transformer, sampling, CLIs."""
