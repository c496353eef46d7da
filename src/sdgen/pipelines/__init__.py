"""sdgen.pipelines"""
