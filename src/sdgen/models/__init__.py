"""sdgen.models"""
