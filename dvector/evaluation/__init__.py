"""evaluation: judging a model. Trials, scores, EER and minDCF (``evaluate``), where results go,
the stored threshold and same/different decisions (``results``), S-norm and AS-norm against a
cohort (``score_norm``) and pictures: t-SNE maps and DET curves (``plot``).

May import ``inference`` (to embed), ``shards`` (cohort shards) and the top-level modules; never
``export``, ``diarization``, ``training``, ``stream`` or ``cli``.
"""
