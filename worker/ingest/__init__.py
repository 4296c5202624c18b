"""Finding and registering files: walk or watch folders, hash what changed, register it in the
database (:mod:`.scanner`, :mod:`.watcher`, :mod:`.hashing`). Never imports the command line, the web
worklist or DICOM networking."""
