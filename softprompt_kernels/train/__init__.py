"""Training soft prompts from the command line: ``softprompt-kernels train`` and ``inspect``."""
