"""What users run without writing code: the embedded tiny LLaMa, shipped texts, the demos and ``lorafusion train``."""
