"""sdgen.train"""
