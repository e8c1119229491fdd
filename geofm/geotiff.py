"""Uncompressed GeoTIFFs read straight from their bytes, for the data check's fast path.

Most published chips are plain uncompressed GeoTIFFs. Opening each through GDAL costs several
times hashing its bytes (driver and CRS set-up), which made checking a dataset far slower than
hashing it. Here tifffile parses the tags (a millisecond) and the pixels are copied out of the
bytes already in memory, strip by strip or tile by tile. `read` returns None for anything it does
not handle (compression, predictors, a CRS that is not an EPSG code, odd layouts): those files
go through rasterio as before.
"""

from __future__ import annotations

import io

import numpy as np

GEO_KEYS, PIXEL_SCALE, TIEPOINT, TRANSFORMATION, GDAL_NODATA = 34735, 33550, 33922, 34264, 42113
EPSG_KEYS = (3072, 2048)  # ProjectedCSTypeGeoKey, GeographicTypeGeoKey
USER_DEFINED = 32767
RASTER_TYPE = 1025  # GTRasterTypeGeoKey: 1 = pixel is area


class Truncated(ValueError):
    """A strip or tile lies beyond the end of the file."""


def _epsg(directory) -> int | None:
    """The EPSG code a GeoKey directory names (projected first), None when it names none (or
    when its pixels are points, which GDAL shifts by half a pixel)."""
    keys = {directory[i]: directory[i + 3] for i in range(4, 4 + 4 * directory[3], 4) if directory[i + 1] == 0}
    if keys.get(RASTER_TYPE, 1) != 1:
        return None
    for key in EPSG_KEYS:
        if 0 < keys.get(key, 0) < USER_DEFINED:
            return keys[key]
    return None


def _transform(tags) -> tuple | None:
    if TRANSFORMATION in tags:
        m = tags[TRANSFORMATION].value
        return (m[0], m[1], m[3], m[4], m[5], m[7])
    if PIXEL_SCALE in tags and TIEPOINT in tags:
        (sx, sy, _), tie = tags[PIXEL_SCALE].value, tags[TIEPOINT].value
        return (sx, 0.0, tie[3] - tie[0] * sx, 0.0, -sy, tie[4] + tie[1] * sy)
    return None


def read(data: bytes) -> tuple[np.ndarray, dict] | None:
    """(bands x height x width array, {crs, res, transform, nodata}) or None (use GDAL)."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        page, tags = tf.pages[0], tf.pages[0].tags
        if page.compression != 1 or page.predictor not in (None, 1) or GEO_KEYS not in tags:
            return None
        epsg = _epsg(tags[GEO_KEYS].value)
        transform = _transform(tags)
        if epsg is None or transform is None or page.imagedepth != 1:
            return None
        bands, height, width = page.samplesperpixel, page.imagelength, page.imagewidth
        dtype = page.dtype.newbyteorder(tf.byteorder)
        separate = page.planarconfig == 2
        chunk_h, chunk_w = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, width)
        per_chunk = 1 if separate else bands
        across = -(-width // chunk_w)
        per_plane = across * -(-height // chunk_h)
        if page.is_contiguous and not separate and not page.is_tiled:  # one run of rows: a view, no copy
            offset = page.dataoffsets[0]
            if offset + height * width * bands * dtype.itemsize > len(data):
                raise Truncated(f"the image data ends past the file's {len(data):,} bytes")
            view = np.frombuffer(data, dtype=dtype, count=height * width * bands, offset=offset)
            return view.reshape(height, width, bands).transpose(2, 0, 1), _geo(tags, epsg, transform)
        array = np.empty((bands, height, width), dtype=dtype.newbyteorder("="))
        for k, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
            plane, index = divmod(k, per_plane) if separate else (0, k)
            row, col = divmod(index, across)
            y, x = row * chunk_h, col * chunk_w
            h, w = min(chunk_h, height - y), min(chunk_w, width - x)
            rows = chunk_h if page.is_tiled else h  # the last strip holds only the rows left
            needed = rows * chunk_w * per_chunk * dtype.itemsize
            if offset + needed > len(data) or count < needed:
                raise Truncated(f"{'tile' if page.is_tiled else 'strip'} {k} ends past the file's {len(data):,} bytes")
            chunk = np.frombuffer(data, dtype=dtype, count=rows * chunk_w * per_chunk, offset=offset)
            chunk = chunk.reshape(rows, chunk_w, per_chunk)[:h, :w]
            target = slice(plane, plane + 1) if separate else slice(None)
            array[target, y : y + h, x : x + w] = chunk.transpose(2, 0, 1)
        return array, _geo(tags, epsg, transform)


def _geo(tags, epsg: int, transform: tuple) -> dict:
    """The georeferencing facts the check compares, in rasterio's terms."""
    nodata = tags[GDAL_NODATA].value if GDAL_NODATA in tags else None
    return {
        "crs": f"EPSG:{epsg}",
        "res": (round(abs(transform[0]), 9), round(abs(transform[4]), 9)),
        "transform": tuple(round(float(v), 6) for v in transform),
        "nodata": float(str(nodata).strip("\x00 ")) if nodata not in (None, "") else None,
    }
