"""Handing work on: the submission seam (:mod:`.submit`: score in this process or send through the
broker; :mod:`.embedded`: the in-process scan as one call), the Celery app and its tasks
(:mod:`.celery_app`, :mod:`.tasks`) and the supervisor of the Celery workers (:mod:`.supervisor`).
Never imports the command line or the web worklist."""
