"""DICOM networking (issue 11): receive films over C-STORE, return results as DICOM objects.

* :mod:`.listener` - the Storage SCP behind ``cxr-triage dicom-listen`` (drops files for ``watch``).
* :mod:`.objects` - SR (TID 1500), Secondary Capture and Key Object Selection built with highdicom.
* :mod:`.sender` - the outbox sender thread (pynetdicom C-STORE, backoff) of watch/scan/worker.
* :mod:`.plan` - ``--send-results`` parsed into what to queue; light, imported by the scoring path.
* The CLI commands and options (dicom-listen, outbox) are in :mod:`worker.cli.dicom_commands`.

The outbox's state transitions live in :mod:`db.outbox`.
"""
