"""sdgen.runtime"""
