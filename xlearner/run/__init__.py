"""Operations beside the method: process groups, preemption, checkpoints, run directories, RNG state."""
