"""Bounds every decoder checks before it allocates memory for pixels."""

#: Largest image accepted, in pixels per frame (a 16k x 16k film is already absurd).
MAX_PIXELS = 16384 * 16384 // 4
#: Largest decoded buffer accepted for one object, bytes (frames x pixels x samples x bytes).
MAX_DECODED_BYTES = 1 << 30
#: Smallest side, in pixels, of an image that can still be read as a chest film.
MIN_SIDE = 200
#: Largest file read at all (bigger files are failed without reading their contents).
MAX_FILE_BYTES = 2 << 30
