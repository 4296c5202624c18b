"""Scoring in a process: decode in a process pool (:mod:`.decode_pool`, :mod:`.prepare`,
:mod:`.allocator`), score and store the results (:mod:`.processing`, :mod:`.overlap`). Never imports
the command line, the web worklist, the queue, or DICOM networking other than the light
:mod:`worker.dicomnet.plan` (what to send, stored with the score)."""
