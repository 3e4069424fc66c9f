"""Teacher-logprob service for on-policy distillation.

`python -m teacher --config FILE` serves nebula.v1.TeacherService: the log-prob of every
completion token of student samples under hosted teachers (optionally top-k), dynamically batched
across concurrent requests and cached. Clients: `nebula.clients.teacher.TeacherClient`, and
`nebula.clients.teacher.check_compatible` to compare a student's tokenizer with a teacher's.
"""
