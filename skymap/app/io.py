"""FITS images in and out: HDU selection, DQ flag bits to masks, headers carried through.

Reading accepts the primary HDU or a named extension (``SCI``), any BITPIX including
big-endian and scaled integers, and headers with non-standard cards (they are kept, and
repaired only where astropy must repair them to write). Data come back native-endian and
floating point (integers become float32).

Writing carries the input header, and so its WCS, onto every product, adds provenance
cards (skymap version, configuration hash, HISTORY lines with the configuration) and is
atomic: the file is written to a temporary name in the destination directory and then
renamed, so that a reader never sees half a file. An existing output is never replaced
unless ``overwrite=True`` is passed; :class:`OutputExistsError` says how to allow it.

Masks follow the package convention: True = excluded. On disk a mask is ``uint8`` with
1 = excluded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from astropy.io import fits

from skymap._validate import as_image, as_mask

__all__ = [
    "FitsImage",
    "NoSpaceError",
    "OutputExistsError",
    "OutputPathError",
    "PRODUCTS",
    "atomic_write",
    "check_outputs",
    "config_hash",
    "config_to_dict",
    "dq_to_mask",
    "header_text",
    "hdu_summary",
    "parse_dq_bits",
    "parse_hdu",
    "product_header",
    "product_paths",
    "read_image",
    "read_mask",
    "write_image",
    "write_json",
    "write_products",
]

log = logging.getLogger(__name__)

#: Names of the FITS products written by :func:`write_products`, in writing order.
PRODUCTS = ("background", "rms", "mask", "subtracted")

# Cards that describe the data layout of the HDU they sit in; a product written with
# other data must let astropy regenerate them rather than inherit stale values.
_STRUCTURAL = re.compile(
    r"^(SIMPLE|XTENSION|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|BZERO|BSCALE|BLANK|"
    r"EXTNAME|EXTVER|EXTLEVEL|CHECKSUM|DATASUM|DATAMIN|DATAMAX)$"
)
_PROVENANCE_KEYS = ("SKYMAPV", "SKYPROD", "SKYCFGH", "SKYSRC")
_HISTORY_WIDTH = 70


class OutputPathError(ValueError):
    """An output path the filesystem cannot take (e.g. a name too long); the message
    names the path and the reason."""


class OutputExistsError(FileExistsError):
    """An output file exists and ``overwrite`` was not requested.

    The message lists every existing path and says how to allow replacing them
    (``overwrite=True`` in Python, ``--overwrite`` on the command line).
    """

    def __init__(self, paths: Iterable[os.PathLike | str]):
        self.paths = [Path(p) for p in paths]
        listed = ", ".join(str(p) for p in self.paths)
        plural = "s" if len(self.paths) > 1 else ""
        super().__init__(
            errno.EEXIST,
            f"refusing to overwrite existing output{plural}: {listed}; pass "
            "overwrite=True (on the command line: --overwrite) to replace "
            f"{'them' if plural else 'it'}",
        )

    def __str__(self) -> str:
        return self.strerror


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitsImage:
    """An image read from FITS, with the header it came with.

    Attributes
    ----------
    data : ndarray
        The image, (y, x), native byte order, float32 or float64 (integer input becomes
        float32 after BSCALE/BZERO are applied). Never a view of the file.
    header : astropy.io.fits.Header
        A copy of the image HDU's header (WCS included), as read.
    mask : ndarray of bool or None
        Pixels excluded by the DQ flags and/or the mask file (True = excluded). NaN and inf
        pixels are not included: every fit excludes them by itself.
    path : Path or None
        The file the image came from.
    hdu : int or str
        The HDU the image came from: EXTNAME (``"SCI,2"`` for a later EXTVER), or the
        index of an unnamed HDU.
    error, weight : ndarray or None
        A 1-sigma error map (``ERR``) or an inverse-variance weight map (``WHT``), as
        read with ``error_hdu`` / ``weight_hdu``; at most one of them.
    noise_hdu : str or None
        Where ``error`` or ``weight`` came from, for the log.
    """

    data: np.ndarray
    header: fits.Header
    mask: np.ndarray | None = None
    path: Path | None = None
    hdu: int | str = 0
    error: np.ndarray | None = None
    weight: np.ndarray | None = None
    noise_hdu: str | None = None

    @property
    def wcs(self):
        """The celestial WCS of :attr:`header` (astropy ``WCS``), built on demand."""
        from astropy.wcs import WCS, FITSFixedWarning

        with warnings.catch_warnings():
            # Old plate solutions and odd keywords trigger fix-up chatter, not errors.
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(self.header)


def parse_hdu(spec: int | str | tuple) -> int | str | tuple[str, int]:
    """An HDU spec as astropy takes it: ``3`` / ``"3"`` (index), ``"SCI"`` (EXTNAME) or
    ``"SCI,2"`` / ``("SCI", 2)`` (EXTNAME and EXTVER, e.g. the second chip of an HST
    exposure).

    Examples
    --------
    >>> parse_hdu("SCI,2"), parse_hdu("1"), parse_hdu("DQ")
    (('SCI', 2), 1, 'DQ')
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        name, sep, ver = text.partition(",")
        if sep and ver.strip().isdigit():
            return (name.strip(), int(ver))
        return text
    return spec


def _hdu_label(hdul: fits.HDUList, index: int) -> int | str:
    """``"SCI"``, ``"SCI,2"`` for a second version, or the index of an unnamed HDU."""
    h = hdul[index]
    if not h.name:
        return index
    return h.name if h.ver == 1 else f"{h.name},{h.ver}"


@contextlib.contextmanager
def _warnings_to_log(path):
    """Log, instead of raising or printing, what astropy says about odd headers: such
    files are normal in astronomy, and reading them must work under ``-W error`` too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.info("%s: %s: %s", path, w.category.__name__, w.message)


@contextlib.contextmanager
def _open_fits(path: Path):
    """``fits.open`` whose errors name the file and say what is wrong with it."""
    try:
        hdul = fits.open(path, memmap=False)
    except (OSError, ValueError) as err:
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a FITS file") from None
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty, not a FITS file") from None
        raise ValueError(
            f"{path} is not a FITS file: it does not start with a FITS header (SIMPLE card)"
            if "SIMPLE" in str(err)
            else f"{path} is not a readable FITS file: {err}"
        ) from None
    with hdul:
        yield hdul


def _hdu_shape(h) -> str:
    """What an HDU holds, from its header alone (no data is read)."""
    hdr = h.header
    naxis = [int(hdr.get(f"NAXIS{i}", 0)) for i in range(1, int(hdr.get("NAXIS", 0)) + 1)]
    if not h.is_image:
        return f"table, {naxis[1] if len(naxis) > 1 else 0} rows"
    if not naxis or 0 in naxis:
        return "no data"
    return f"image {' x '.join(map(str, naxis[::-1]))}"


def hdu_summary(hdul: fits.HDUList) -> str:
    """One line listing every HDU: index, name and what it holds, for error messages."""
    items = []
    for i, h in enumerate(hdul):
        label = _hdu_label(hdul, i)
        name = f" {label}" if isinstance(label, str) else ""
        items.append(f"{i}{name} ({_hdu_shape(h)})")
    return "; ".join(items)


def _check_complete(hdul: fits.HDUList, index: int, path: Path) -> None:
    """Raise if the file ends before the data of HDU ``index`` does."""
    if path.suffix.lower() in (".gz", ".bz2", ".zip"):
        return  # sizes refer to the decompressed stream
    try:
        info = hdul[index].fileinfo()
        needed = int(info["datLoc"]) + int(info["datSpan"])
        size = path.stat().st_size
    except (AttributeError, KeyError, TypeError, OSError):  # pragma: no cover - odd files
        return
    if size < needed:
        raise ValueError(
            f"{path} is truncated: HDU {_hdu_label(hdul, index)!r} needs {needed} bytes, "
            f"the file has {size}"
        )


def _pick_hdu(hdul: fits.HDUList, hdu: int | str | tuple | None, path: Any) -> int:
    """Index of the HDU holding the image: the requested one, or the first 2D image
    (an extension named SCI first)."""
    if hdu is not None:
        try:
            index = hdul.index_of(parse_hdu(hdu))
            hdul[index]
            if index < 0:
                raise IndexError(index)
            return index
        except (KeyError, IndexError):
            raise ValueError(
                f"hdu {hdu!r} not found in {path}; its HDUs are: {hdu_summary(hdul)}. "
                "Choose one with hdu= (an index, EXTNAME or EXTNAME,EXTVER)"
            ) from None
    candidates = [i for i, h in enumerate(hdul) if h.is_image and h.header.get("NAXIS", 0) >= 2]
    for i in candidates:
        if hdul[i].name == "SCI":
            return i
    if not candidates:
        raise ValueError(
            f"{path} holds no 2D image, so there is nothing to fit; its HDUs are: "
            f"{hdu_summary(hdul)}"
        )
    return candidates[0]


def _as_2d(data: np.ndarray, what: str) -> np.ndarray:
    """Drop degenerate leading axes (NAXIS3 = 1 cubes); anything else must be 2D."""
    if data is None:
        raise ValueError(f"{what} has no data")
    if data.ndim > 2 and all(n == 1 for n in data.shape[:-2]):
        data = data.reshape(data.shape[-2:])
    if data.ndim != 2:
        raise ValueError(f"{what} must be a 2D image, got shape {data.shape}")
    return data


def parse_dq_bits(bits: Any) -> int | None:
    """Turn a DQ flag specification into an integer bit mask (or None = any flag).

    Parameters
    ----------
    bits : None, int, str or iterable of int
        None: any nonzero DQ value excludes the pixel. An int is a bit mask. A string
        lists flag values separated by ``,`` ``+`` ``|`` or spaces, each decimal, hex
        (``0x10``) or a bit number written ``bit4`` (= 16). An iterable of ints is OR'ed.

    Returns
    -------
    int or None

    Examples
    --------
    >>> parse_dq_bits("1,4,0x10")
    21
    >>> parse_dq_bits("bit0+bit3")
    9
    >>> parse_dq_bits(None) is None
    True
    """
    if bits is None:
        return None
    spec = bits
    if isinstance(bits, str):
        tokens = [t for t in re.split(r"[,+|\s]+", bits.strip()) if t]
        if not tokens:
            raise ValueError("dq_bits must list at least one flag value, got an empty string")
        values = []
        for tok in tokens:
            low = tok.lower()
            try:
                if low.startswith("bit"):
                    values.append(1 << int(low[3:]))
                else:
                    values.append(int(low, 0))
            except ValueError:
                raise ValueError(
                    f"dq_bits entry {tok!r} is not an integer, a hex value (0x10) or a "
                    "bit number (bit4)"
                ) from None
        bits = values
    if isinstance(bits, (int, np.integer)):
        values = [int(bits)]
    else:
        try:
            values = [int(b) for b in bits]
        except (TypeError, ValueError):
            raise ValueError(
                f"dq_bits must be None, an int bit mask, a string such as '1,4,16' or a "
                f"list of ints; got {bits!r}"
            ) from None
    if any(v < 0 for v in values):
        raise ValueError(f"dq_bits must be non-negative flag values, got {values}")
    if any(v >= 1 << 64 for v in values):
        raise ValueError(
            f"dq_bits {spec!r} names a flag above bit63; DQ flags are integers of at most "
            "64 bits (bit0 to bit63)"
        )
    mask = 0
    for v in values:
        mask |= v
    if mask == 0:
        raise ValueError("dq_bits selects no flag bit (all values are 0)")
    return mask


def dq_to_mask(dq: np.ndarray, bits: Any = None) -> np.ndarray:
    """Return the pixels whose DQ value has any of ``bits`` set (True = excluded).

    Parameters
    ----------
    dq : array of int
        Data-quality flags, any integer dtype or byte order.
    bits : see :func:`parse_dq_bits`
        Flags that exclude a pixel; None excludes every pixel with any flag set.

    Returns
    -------
    ndarray of bool

    Examples
    --------
    >>> dq_to_mask(np.array([[0, 1], [4, 5]]), bits="4").tolist()
    [[False, False], [True, True]]
    """
    # imported here: masking pulls in scipy.ndimage and numba, which the command line
    # loads only when it runs a pipeline
    from skymap.masking.maskers import FlagMasker

    dq = np.asarray(dq)
    if dq.dtype.kind == "f":
        # Some pipelines store flags as floats; only exact integers are meaningful.
        if not np.all(np.isfinite(dq) & (dq == np.round(dq))):
            raise ValueError("dq must hold integer flag values")
        dq = dq.astype(np.int64)
    elif dq.dtype.kind == "b":
        # flag values 0 and 1 (FlagMasker would take booleans for a finished mask)
        dq = dq.view(np.uint8)
    elif dq.dtype.kind not in "iu":
        raise TypeError(f"dq must hold integer flags, got dtype {dq.dtype}")
    # None (any flag) is FlagMasker's bitmask 0
    return FlagMasker(bitmask=parse_dq_bits(bits) or 0).to_mask(dq)


def read_image(
    path: os.PathLike | str,
    *,
    hdu: int | str | None = None,
    dq: int | str | bool | None = None,
    dq_bits: Any = None,
    mask: os.PathLike | str | np.ndarray | None = None,
    error_hdu: int | str | bool | None = False,
    weight_hdu: int | str | bool | None = False,
) -> FitsImage:
    """Read a 2D image from a FITS file, with its header and any DQ or mask file.

    Parameters
    ----------
    path : path-like
        FITS file.
    hdu : int or str, optional
        HDU holding the image: index, EXTNAME, or ``"EXTNAME,EXTVER"`` (``"SCI,2"``).
        Default: an extension named ``SCI`` if there is one, else the first HDU with 2D
        data (the primary when it has data).
    dq : int, str or bool, optional
        HDU holding data-quality flags (same forms as ``hdu``). Default (None): the
        ``DQ`` extension with the image's EXTVER, when present. False ignores DQ flags
        even when a ``DQ`` extension exists.
    dq_bits : optional
        Flags that exclude a pixel (see :func:`parse_dq_bits`); None = any flag.
        Giving ``dq_bits`` without a DQ extension is an error.
    mask : path-like or array, optional
        An extra mask (nonzero / True = excluded), a FITS file or an array.
    error_hdu, weight_hdu : int, str, bool or None
        HDU of a 1-sigma error map or of an inverse-variance weight map (drizzle
        ``WHT``), same forms as ``hdu``; at most one of them. None picks up an ``ERR``
        extension (else a ``WHT`` one) with the image's EXTVER when the file has one, as
        HST and JWST files do (only when both are None); False (the default) reads
        neither.

    Returns
    -------
    FitsImage

    Examples
    --------
    >>> import tempfile, os
    >>> from astropy.io import fits
    >>> d = tempfile.mkdtemp()
    >>> fn = os.path.join(d, "x.fits")
    >>> fits.PrimaryHDU(np.arange(6, dtype=">i2").reshape(2, 3)).writeto(fn)
    >>> img = read_image(fn)
    >>> img.data.dtype, img.data.shape
    (dtype('float32'), (2, 3))
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input image {path} does not exist")
    with _warnings_to_log(path), _open_fits(path) as hdul:
        which = _pick_hdu(hdul, hdu, path)
        image_hdu = hdul[which]
        label = _hdu_label(hdul, which)
        _check_complete(hdul, which, path)
        data = _as_2d(image_hdu.data, f"HDU {label!r} of {path}")
        # memmap=False: the array is ours, not a view of the file; FITS data are
        # big-endian or scaled, so as_image converts into a new native array anyway.
        data = as_image(data, f"HDU {label!r} of {path}")
        header = image_hdu.header.copy()
        dq_mask = _read_dq(hdul, dq, dq_bits, image_hdu.ver, data.shape, path)
        noise, kind, noise_label = _read_noise(
            hdul, error_hdu, weight_hdu, image_hdu.ver, data.shape, path
        )
    extra = read_mask(mask, shape=data.shape) if isinstance(mask, (str, os.PathLike)) else None
    if mask is not None and extra is None:
        extra = as_mask(mask, data.shape, "mask")
    masks = [m for m in (dq_mask, extra) if m is not None]
    combined = np.logical_or.reduce(masks) if masks else None
    return FitsImage(
        data=data,
        header=header,
        mask=combined,
        path=path,
        hdu=label,
        error=noise if kind == "error" else None,
        weight=noise if kind == "weight" else None,
        noise_hdu=noise_label,
    )


def _read_noise(hdul, error_hdu, weight_hdu, ver, shape, path):
    """(map, "error" | "weight" | None, HDU label) for :func:`read_image`."""
    explicit = [(k, s) for k, s in (("error", error_hdu), ("weight", weight_hdu)) if s]
    if len(explicit) == 2:
        raise ValueError(
            f"error_hdu and weight_hdu are mutually exclusive for {path}: give one of them"
        )
    if explicit:
        kind, spec = explicit[0]
        which = _pick_hdu(hdul, spec, path)
    else:
        # only when neither is set: False for either means "no noise map"
        both_auto = error_hdu is None and weight_hdu is None
        auto = ["error", "weight"] if both_auto else []
        names = {"error": "ERR", "weight": "WHT"}
        found = [
            (k, i)
            for k in auto
            for i, h in enumerate(hdul)
            if h.name == names[k] and h.ver == ver and h.data is not None
        ]
        if not found:
            return None, None, None
        kind, which = found[0]
    label = _hdu_label(hdul, which)
    what = f"{kind} map (HDU {label!r}) of {path}"
    noise = as_image(_as_2d(hdul[which].data, what), what)
    if noise.shape != shape:
        raise ValueError(f"{what} has shape {noise.shape}, but the image has shape {shape}")
    return noise, kind, str(label)


def _read_dq(hdul, dq, dq_bits, ver, shape, path) -> np.ndarray | None:
    if dq is False:
        return None
    if dq is None or dq is True:
        versions = [h.ver for h in hdul if h.name == "DQ"]
        if not versions:
            if dq is True or dq_bits is not None:
                raise ValueError(
                    f"dq_bits given but {path} has no DQ extension; name the flag HDU with "
                    "dq= (command line: --dq-hdu)"
                )
            return None
        # The flags of chip N sit in DQ version N (HST, JWST multi-chip layouts).
        dq = ("DQ", ver) if ver in versions else "DQ"
        if len(versions) > 1 and ver not in versions:
            raise ValueError(
                f"{path} has DQ versions {versions} but the image is version {ver}; name the "
                "flag HDU with dq= (command line: --dq-hdu)"
            )
    try:
        flags = hdul[parse_hdu(dq)].data
    except (KeyError, IndexError):
        raise ValueError(f"dq HDU {dq!r} not found in {path}") from None
    flags = _as_2d(flags, f"DQ HDU {dq!r} of {path}")
    if flags.shape != tuple(shape):
        raise ValueError(
            f"DQ HDU {dq!r} of {path} has shape {flags.shape}, the image has {tuple(shape)}"
        )
    return dq_to_mask(flags, dq_bits)


def read_mask(
    path: os.PathLike | str, *, hdu: int | str | None = None, shape: Sequence[int] | None = None
) -> np.ndarray:
    """Read a mask image from FITS: nonzero (or NaN) = excluded.

    Parameters
    ----------
    path : path-like
        FITS file, e.g. a ``*_mask.fits`` product.
    hdu : int or str, optional
        HDU to read; default the first 2D image.
    shape : (ny, nx), optional
        Required shape; a mismatch raises ValueError.

    Returns
    -------
    ndarray of bool
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mask file {path} does not exist")
    with _warnings_to_log(path), _open_fits(path) as hdul:
        which = _pick_hdu(hdul, hdu, path)
        _check_complete(hdul, which, path)
        data = np.asarray(_as_2d(hdul[which].data, f"mask HDU of {path}"))
    if shape is not None and data.shape != tuple(shape):
        raise ValueError(f"mask {path} has shape {data.shape}, the image has {tuple(shape)}")
    if data.dtype.kind == "f":
        return ~np.isfinite(data) | (data != 0)
    return data != 0


def config_to_dict(config: Any) -> dict:
    """A JSON-serialisable dict describing ``config`` (a dataclass, a mapping or None)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=_jsonable))
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        try:
            from skymap.app import config as _config

            return json.loads(json.dumps(_config.to_dict(config), default=_jsonable))
        except (ImportError, AttributeError, TypeError, ValueError):
            # Configurations holding user plug-ins may not serialise; their repr still
            # documents the run.
            return {"type": type(config).__name__, "repr": repr(config)}
    return {"type": type(config).__name__, "repr": repr(config)}


def _jsonable(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, **dataclasses.asdict(obj)}
    return repr(obj)


def config_hash(config: Any) -> str:
    """First 16 hex digits of the SHA-256 of the configuration's canonical JSON.

    Two runs with equal configurations have equal hashes, whatever the field order.

    Examples
    --------
    >>> config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    True
    """
    canonical = json.dumps(config_to_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def header_text(text: str) -> str:
    """``text`` in the printable ASCII that FITS header values allow: other characters
    are written as Python escapes (``\\u00e9``), so that a path with accents or symbols
    stays recognisable (the metrics JSON keeps it exactly).

    Examples
    --------
    >>> print(header_text("démo/ímage☃.fits"))
    d\\xe9mo/\\xedmage\\u2603.fits
    """
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else repr(c)[1:-1] for c in escaped)


def product_header(
    header: fits.Header | None = None,
    *,
    product: str | None = None,
    config: Any = None,
    source: os.PathLike | str | None = None,
    history: Iterable[str] = (),
) -> fits.Header:
    """A header for a product: the input's cards (WCS included) plus provenance.

    Structural cards (BITPIX, NAXISn, BZERO, BSCALE, EXTNAME, checksums, DATAMIN/MAX...)
    are dropped so that astropy writes ones that describe the new data. Provenance cards:
    ``SKYMAPV`` (skymap version), ``SKYPROD`` (product name), ``SKYCFGH`` (configuration
    hash, see :func:`config_hash`), ``SKYSRC`` (input file name), and HISTORY lines with
    the configuration as JSON. No date is written, so that identical runs give
    byte-identical files.

    Examples
    --------
    >>> h = product_header(fits.Header({"CRPIX1": 5.0}), product="background")
    >>> h["CRPIX1"], h["SKYPROD"]
    (5.0, 'background')
    """
    from skymap import __version__

    out = fits.Header() if header is None else header.copy()
    for key in {k for k in out if _STRUCTURAL.match(k) or k in _PROVENANCE_KEYS}:
        del out[key]
    out["SKYMAPV"] = (__version__, "skymap version that wrote this file")
    if product is not None:
        out["SKYPROD"] = (product, "skymap product")
    out["SKYCFGH"] = (config_hash(config), "SHA-256 (16 hex) of the skymap configuration")
    if source is not None:
        name = header_text(Path(source).name)
        # A long value would need CONTINUE cards; the full path is in HISTORY anyway.
        out["SKYSRC"] = (name if len(name) <= 60 else name[:57] + "...", "skymap input file")
        out.add_history(header_text(f"skymap: input {source}")[:_HISTORY_WIDTH])
    for line in history:
        out.add_history(header_text(str(line))[:_HISTORY_WIDTH])
    cfg = config_to_dict(config)
    if cfg:
        text = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
        out.add_history("skymap configuration (JSON, wrapped):")
        for i in range(0, len(text), _HISTORY_WIDTH):
            out.add_history(text[i : i + _HISTORY_WIDTH])
    return out


def check_outputs(paths: Iterable[os.PathLike | str], *, overwrite: bool = False) -> None:
    """Raise :class:`OutputExistsError` listing every existing path, unless ``overwrite``,
    and :class:`OutputPathError` for a path the filesystem cannot take.

    Call it before expensive work so that a run refuses up front, not after an hour.
    """
    paths = [Path(p) for p in paths]
    existing = []
    for p in paths:
        try:  # a name too long raises here, not a "does not exist"
            if p.exists():
                existing.append(p)
        except OSError as err:
            raise OutputPathError(f"cannot use output path {p}: {err.strerror}") from err
    if existing and not overwrite:
        raise OutputExistsError(existing)


def atomic_write(
    path: os.PathLike | str, write: Callable[[IO[bytes]], None], *, overwrite: bool = False
) -> Path:
    """Write a file atomically: ``write(fileobj)`` into a temporary file, then rename.

    The temporary file sits in the destination directory (same filesystem, so the
    rename is atomic) and is removed if ``write`` fails. Without ``overwrite``, an
    existing destination raises :class:`OutputExistsError`, also when it appears while
    writing (the final step is a hard link, which refuses to replace a file).

    Parameters
    ----------
    path : path-like
        Destination; its directory must exist.
    write : callable
        Receives an open binary file object and writes the content.
    overwrite : bool
        Replace an existing destination.

    Returns
    -------
    Path
        The destination.
    """
    path = Path(path)
    check_outputs([path], overwrite=overwrite)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        except Exception as err:
            # astropy can turn a failed write into an unrelated error (an AttributeError
            # while it cleans up); say what happened when the disk is full
            if _caused_by(err, errno.ENOSPC):
                raise NoSpaceError(path) from err
            raise
        os.chmod(tmp, 0o666 & ~_UMASK)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


class NoSpaceError(OSError):
    """The disk filled up while writing ``path``."""

    def __init__(self, path: os.PathLike | str):
        super().__init__(errno.ENOSPC, f"No space left on device: {path}", str(path))

    def __str__(self) -> str:
        return self.strerror


def _caused_by(err: BaseException | None, code: int) -> bool:
    """Whether ``err`` or an exception it was raised from carries errno ``code``."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == code:
            return True
        err = err.__cause__ or err.__context__
    return False


def _link_no_replace(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError([path]) from None
    except OSError:
        # Filesystems without hard links: the existence check above is the guard.
        if path.exists():
            raise OutputExistsError([path]) from None
        os.replace(tmp, path)


def _read_umask() -> int:
    # os.umask can only be read by setting it; do it once, at import, rather than while
    # other threads (dask workers) may be creating files.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_image(
    path: os.PathLike | str,
    data: np.ndarray,
    *,
    header: fits.Header | None = None,
    product: str | None = None,
    config: Any = None,
    source: os.PathLike | str | None = None,
    history: Iterable[str] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``data`` as the primary HDU of a new FITS file, atomically.

    Parameters
    ----------
    path : path-like
        Destination file.
    data : ndarray
        2D image. Boolean data (masks) are written as uint8, 1 = excluded.
    header : Header, optional
        The input image's header: its cards, WCS included, are carried over.
    product, config, source, history
        Provenance, see :func:`product_header`.
    overwrite : bool
        Replace an existing file; otherwise :class:`OutputExistsError`.

    Returns
    -------
    Path

    Examples
    --------
    >>> import tempfile, os
    >>> fn = os.path.join(tempfile.mkdtemp(), "bkg.fits")
    >>> _ = write_image(fn, np.zeros((4, 4), np.float32), product="background")
    >>> fits.getheader(fn)["SKYPROD"]
    'background'
    """
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    hdr = product_header(header, product=product, config=config, source=source, history=history)
    if data.dtype == np.uint8 and product == "mask":
        hdr["BUNIT"] = ("", "mask: 1 = excluded, 0 = used")
    hdu = fits.PrimaryHDU(data=data, header=hdr)

    def _write(fh):
        with _warnings_to_log(path):
            # Non-standard input cards are fixed where FITS requires it, kept otherwise;
            # a product must never fail to write because of an odd header.
            hdu.writeto(fh, output_verify="silentfix+ignore")

    return atomic_write(path, _write, overwrite=overwrite)


def write_json(path: os.PathLike | str, obj: Any, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON, atomically (numpy scalars and arrays allowed)."""
    payload = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable, allow_nan=True)
    return atomic_write(path, lambda fh: fh.write(payload.encode() + b"\n"), overwrite=overwrite)


def product_paths(directory: os.PathLike | str, stem: str) -> dict[str, Path]:
    """The FITS product paths ``<directory>/<stem>_<product>.fits``, keyed by product."""
    directory = Path(directory)
    return {p: directory / f"{stem}_{p}.fits" for p in PRODUCTS}


def write_products(
    directory: os.PathLike | str,
    stem: str,
    *,
    image: np.ndarray,
    background: np.ndarray,
    rms: np.ndarray,
    mask: np.ndarray,
    header: fits.Header | None = None,
    config: Any = None,
    source: os.PathLike | str | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write background, rms, mask and background-subtracted images for one input.

    Every file carries the input header and the same provenance. Existing outputs are
    checked all together before anything is written.

    Parameters
    ----------
    directory : path-like
        Output directory (created if missing).
    stem : str
        File name stem: ``<stem>_background.fits`` etc.
    image, background, rms, mask : ndarray
        Input image, fitted background and rms, final mask (True = excluded).
    header, config, source
        Input header and provenance, see :func:`product_header`.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    dict
        Product name -> path, in :data:`PRODUCTS` order.
    """
    paths = product_paths(directory, stem)
    check_outputs(paths.values(), overwrite=overwrite)
    Path(directory).mkdir(parents=True, exist_ok=True)
    background = np.asarray(background)
    arrays = {
        "background": background,
        "rms": np.asarray(rms),
        "mask": np.asarray(mask, dtype=bool),
        "subtracted": np.asarray(image) - background,
    }
    for name, path in paths.items():
        write_image(
            path,
            arrays[name],
            header=header,
            product=name,
            config=config,
            source=source,
            overwrite=overwrite,
        )
    return paths
