"""The command line (``cxr-triage``): the Typer app and one module per command group.

* :mod:`.entry` - the console script's entry; imports nothing until it runs (decode processes
  re-import it, so it must stay light: keep this ``__init__`` empty of imports too).
* :mod:`.app` - the app, its global options and the scanning/serving commands (scan, watch, worker,
  status, export, review, requeue, dicom-check).
* :mod:`.model_commands`, :mod:`.calibration_commands`, :mod:`.web_commands`, :mod:`.dicom_commands` -
  the other command groups, registered on the app.
* :mod:`.options`, :mod:`.progress`, :mod:`.startup` - options made from Settings, the progress bar,
  and how every command starts (settings, logging, database schema).

Nothing outside this package imports it.
"""
