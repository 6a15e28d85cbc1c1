"""Pareto studies: objectives × weight vectors, trained, evaluated with held-out judges and reported.

`spec` (study files and their points), `runner` (training the points through `launch.backends`),
`progress` (the progress line), `base_point` (the base model's step-0 checkpoint), `cli`
(`python -m alignax.study`); evaluation and the report are `evaluation` / `report`.
"""
