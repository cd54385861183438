"""Dataset curation, s1-style: a large candidate pool -> a small, hard, diverse set that fits the training shapes.

Stages (one module each): quality (malformed rows, duplicates), fit (the fixed
training shapes), difficulty (baseline models' k-sample solve counts, cached),
diversity (stratified sampling); `pipeline.run` chains them and writes the set
and the report.
"""
