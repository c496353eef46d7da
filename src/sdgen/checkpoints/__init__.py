"""sdgen.checkpoints"""
