"""What ``scripts/demo.py`` needs besides its command lines: the report (tables, ``summary.json``, figures) of
the results CSVs the demo's ``run.py`` calls wrote, and the predictions of their final models.

Not a library module: it reads ``run.py``'s outputs and builds its models with ``run.build_model``. Not named
``demo`` either, which would shadow ``scripts/demo.py`` when that folder is on the import path.
"""
