"""Training the shipped demo and study MoEs (scripts/train_demo_moe.py): data and tokenizer, model building
and upcycling, held-out greedy evaluation."""
