"""Laboratory line lists of arc lamps and the spectral features marked on plots.

Every wavelength here is in **air**, in Angstrom (the convention of ground-based optical spectra
and of the BeSS database).

Sources
-------
* **Ne I, Ar I, Ar II**: NIST Atomic Spectra Database, version 5 (Kramida, Ralchenko, Reader and
  NIST ASD Team, https://physics.nist.gov/asd), observed wavelengths; Ne I from Saloman &
  Sansonetti (2004, J. Phys. Chem. Ref. Data 33, 1113), Ar I from Whaling et al. (1995, 2002)
  and Norle'n (1973), Ar II from Whaling et al. (1995). NIST lists vacuum wavelengths below
  2000 A and air above; the values here were taken from a NIST vacuum export (lines of relative
  intensity >= 1000 for Ne I, >= 100 for Ar) and converted to air with the IAU standard formula
  of Morton (2000, ApJS 130, 403) as implemented by ``specutils.utils.wcs_utils.vac_to_air``.
  Check: for 39 Ne I lines also known from NIST's own air table (5852.4878, 6402.2480,
  7032.4131 ...) the converted values agree to <= 0.002 A. Ne I 6402.248 (absent from the
  export) is NIST's air value. Intensities are NIST's relative intensities: indicative only, the
  scale differs between spectral regions and a real lamp (pressure, window, detector QE) differs
  from them; they only order the lines for the first guess of the identification.
* **He I, Hg I**: NIST ASD air wavelengths of the strong lines (He I: Martin 1960 / Drake 2006
  compilations; Hg I: Sansonetti & Reader 2001, Saloman 2006).
* **Stellar and telluric features** (plots only): Balmer lines in air from Wiese & Fuhr (2009,
  J. Phys. Chem. Ref. Data 38, 565); He I/He II as NIST; telluric bands after the usual
  spectroscopy atlases (O2 B band head 6867 A, A band 7594 A; H2O bands near 6510, 7186, 8227 A).

Amateur spectrograph users need: Ne (glow lamps, SBIG SGS, LHIRES), Ar+Ne (Shelyak Alpy600
calibration module), Hg (energy-saving lamps, in many amateur calibrations), He (some modules).
"""

from __future__ import annotations

__all__ = [
    "LAMP_LINES",
    "BALMER_A",
    "HELIUM_A",
    "TELLURIC_BANDS_A",
    "known_elements",
    "lamp_lines",
]

#: (air wavelength A, NIST relative intensity, spectrum) per element.
_NE = (
    (3600.169, 1000, "NeI"),
    (3633.664, 1000, "NeI"),
    (3682.242, 1000, "NeI"),
    (3685.735, 1000, "NeI"),
    (4536.300, 1500, "NeI"),
    (4537.677, 3000, "NeI"),
    (4537.754, 10000, "NeI"),
    (4702.530, 1500, "NeI"),
    (4704.395, 15000, "NeI"),
    (4708.859, 12000, "NeI"),
    (4710.065, 10000, "NeI"),
    (4884.917, 10000, "NeI"),
    (4885.097, 1000, "NeI"),
    (4955.390, 1500, "NeI"),
    (4957.033, 10000, "NeI"),
    (4957.122, 1500, "NeI"),
    (5005.159, 5000, "NeI"),
    (5031.348, 2500, "NeI"),
    (5037.751, 5000, "NeI"),
    (5080.383, 1500, "NeI"),
    (5116.503, 1500, "NeI"),
    (5122.256, 1500, "NeI"),
    (5122.361, 1500, "NeI"),
    (5144.938, 5000, "NeI"),
    (5193.125, 1500, "NeI"),
    (5193.224, 1500, "NeI"),
    (5203.896, 1500, "NeI"),
    (5330.777, 6000, "NeI"),
    (5341.094, 10000, "NeI"),
    (5343.283, 6000, "NeI"),
    (5355.164, 1500, "NeI"),
    (5400.562, 20000, "NeI"),
    (5412.649, 2500, "NeI"),
    (5418.558, 1500, "NeI"),
    (5433.651, 2500, "NeI"),
    (5448.509, 1500, "NeI"),
    (5562.442, 1500, "NeI"),
    (5562.766, 5000, "NeI"),
    (5656.659, 5000, "NeI"),
    (5689.816, 1500, "NeI"),
    (5718.880, 1500, "NeI"),
    (5719.225, 5000, "NeI"),
    (5748.298, 5000, "NeI"),
    (5764.419, 7000, "NeI"),
    (5804.449, 5000, "NeI"),
    (5811.407, 3000, "NeI"),
    (5820.156, 5000, "NeI"),
    (5852.488, 20000, "NeI"),
    (5872.827, 5000, "NeI"),
    (5881.895, 10000, "NeI"),
    (5913.633, 2500, "NeI"),
    (5918.907, 2500, "NeI"),
    (5944.834, 5000, "NeI"),
    (5965.471, 5000, "NeI"),
    (5974.627, 5000, "NeI"),
    (5975.534, 6000, "NeI"),
    (5987.907, 1500, "NeI"),
    (6000.927, 1000, "NeI"),
    (6029.997, 10000, "NeI"),
    (6074.337, 10000, "NeI"),
    (6096.163, 3000, "NeI"),
    (6128.450, 1000, "NeI"),
    (6142.508, 1000, "NeI"),
    (6143.063, 10000, "NeI"),
    (6150.298, 1000, "NeI"),
    (6163.594, 10000, "NeI"),
    (6182.146, 1500, "NeI"),
    (6205.777, 1000, "NeI"),
    (6213.876, 1500, "NeI"),
    (6217.281, 10000, "NeI"),
    (6246.729, 1000, "NeI"),
    (6258.788, 1000, "NeI"),
    (6266.495, 10000, "NeI"),
    (6293.745, 1000, "NeI"),
    (6304.789, 1000, "NeI"),
    (6313.685, 1500, "NeI"),
    (6328.164, 3000, "NeI"),
    (6330.889, 1500, "NeI"),
    (6334.427, 10000, "NeI"),
    (6351.853, 1000, "NeI"),
    (6364.996, 1000, "NeI"),
    (6382.991, 10000, "NeI"),
    (6402.248, 20000, "NeI"),
    (6409.747, 1500, "NeI"),
    (6421.704, 1000, "NeI"),
    (6444.712, 1500, "NeI"),
    (6506.528, 15000, "NeI"),
    (6532.882, 1000, "NeI"),
    (6598.953, 10000, "NeI"),
    (6602.901, 1000, "NeI"),
    (6652.092, 1500, "NeI"),
    (6666.892, 1000, "NeI"),
    (6678.276, 5000, "NeI"),
    (6929.467, 100000, "NeI"),
    (7024.050, 34000, "NeI"),
    (7032.413, 85000, "NeI"),
    (7051.292, 2200, "NeI"),
    (7059.108, 10000, "NeI"),
    (7173.938, 77000, "NeI"),
    (7245.166, 77000, "NeI"),
    (7438.898, 60000, "NeI"),
    (7472.438, 3100, "NeI"),
    (7488.871, 32000, "NeI"),
    (7535.774, 28000, "NeI"),
    (7544.044, 13000, "NeI"),
    (7936.996, 1300, "NeI"),
    (7943.180, 7900, "NeI"),
    (8082.457, 5700, "NeI"),
    (8118.549, 3800, "NeI"),
    (8128.911, 1200, "NeI"),
    (8136.406, 17000, "NeI"),
    (8259.379, 3300, "NeI"),
    (8266.077, 7200, "NeI"),
    (8300.325, 29000, "NeI"),
    (8301.557, 1900, "NeI"),
    (8365.746, 4600, "NeI"),
    (8376.359, 6600, "NeI"),
    (8377.607, 76000, "NeI"),
    (8417.160, 2700, "NeI"),
    (8418.426, 26000, "NeI"),
    (8463.357, 3700, "NeI"),
    (8484.442, 1300, "NeI"),
    (8495.359, 69000, "NeI"),
    (8544.695, 1600, "NeI"),
    (8571.353, 2900, "NeI"),
    (8582.903, 1600, "NeI"),
    (8591.258, 41000, "NeI"),
    (8634.647, 35000, "NeI"),
    (8647.041, 6000, "NeI"),
    (8654.383, 64000, "NeI"),
    (8655.522, 7600, "NeI"),
    (8679.493, 13000, "NeI"),
    (8681.921, 15000, "NeI"),
    (8704.112, 2900, "NeI"),
    (8771.657, 10000, "NeI"),
    (8778.732, 2100, "NeI"),
    (8780.622, 57000, "NeI"),
    (8783.754, 43000, "NeI"),
    (8853.867, 27000, "NeI"),
    (8865.306, 2100, "NeI"),
    (8865.756, 15000, "NeI"),
    (8919.501, 6400, "NeI"),
    (8988.556, 1800, "NeI"),
)
_AR = (
    (3729.308, 234, "ArII"),
    (3850.581, 263, "ArII"),
    (3868.528, 166, "ArII"),
    (3928.623, 191, "ArII"),
    (4013.856, 145, "ArII"),
    (4042.893, 288, "ArII"),
    (4072.004, 708, "ArII"),
    (4079.573, 100, "ArII"),
    (4112.815, 513, "ArII"),
    (4131.723, 891, "ArII"),
    (4158.589, 400, "ArI"),
    (4190.713, 100, "ArI"),
    (4198.317, 200, "ArI"),
    (4200.674, 400, "ArI"),
    (4228.158, 331, "ArII"),
    (4237.219, 269, "ArII"),
    (4259.362, 200, "ArI"),
    (4266.286, 100, "ArI"),
    (4266.526, 288, "ArII"),
    (4272.169, 150, "ArI"),
    (4277.528, 1995, "ArII"),
    (4300.101, 100, "ArI"),
    (4331.199, 603, "ArII"),
    (4332.029, 162, "ArII"),
    (4333.560, 100, "ArI"),
    (4348.063, 1995, "ArII"),
    (4352.205, 200, "ArII"),
    (4370.753, 617, "ArII"),
    (4371.328, 355, "ArII"),
    (4375.954, 209, "ArII"),
    (4379.666, 550, "ArII"),
    (4400.096, 257, "ArII"),
    (4400.986, 8710, "ArII"),
    (4426.001, 1514, "ArII"),
    (4430.188, 661, "ArII"),
    (4430.996, 251, "ArII"),
    (4474.759, 347, "ArII"),
    (4481.810, 646, "ArII"),
    (4510.733, 100, "ArI"),
    (4545.052, 1738, "ArII"),
    (4579.349, 871, "ArII"),
    (4589.898, 25704, "ArII"),
    (4598.762, 182, "ArII"),
    (4609.567, 2291, "ArII"),
    (4637.232, 148, "ArII"),
    (4657.901, 1445, "ArII"),
    (4726.868, 23442, "ArII"),
    (4732.053, 200, "ArII"),
    (4735.905, 1000, "ArII"),
    (4764.864, 2344, "ArII"),
    (4806.020, 1820, "ArII"),
    (4847.809, 832, "ArII"),
    (4879.863, 2239, "ArII"),
    (4889.042, 288, "ArII"),
    (4904.751, 107, "ArII"),
    (4933.209, 251, "ArII"),
    (4965.079, 891, "ArII"),
    (4972.160, 100, "ArII"),
    (5009.334, 355, "ArII"),
    (5017.163, 7413, "ArII"),
    (5062.037, 398, "ArII"),
    (5141.783, 224, "ArII"),
    (5145.308, 162, "ArII"),
    (6114.923, 537, "ArII"),
    (6172.277, 407, "ArII"),
    (6483.082, 120, "ArII"),
    (6638.220, 151, "ArII"),
    (6643.697, 269, "ArII"),
    (6666.359, 117, "ArII"),
    (6677.282, 100, "ArI"),
    (6684.292, 204, "ArII"),
    (6752.834, 150, "ArI"),
    (6861.269, 112, "ArII"),
    (6871.289, 150, "ArI"),
    (6965.431, 10000, "ArI"),
    (7030.251, 150, "ArI"),
    (7067.218, 10000, "ArI"),
    (7147.042, 1000, "ArI"),
    (7272.936, 2000, "ArI"),
    (7383.980, 10000, "ArI"),
    (7503.869, 20000, "ArI"),
    (7514.652, 15000, "ArI"),
    (7635.106, 25000, "ArI"),
    (7723.761, 15000, "ArI"),
    (7724.207, 10000, "ArI"),
    (7948.176, 20000, "ArI"),
    (8006.157, 20000, "ArI"),
    (8014.786, 25000, "ArI"),
    (8103.693, 20000, "ArI"),
    (8115.310, 35000, "ArI"),
    (8264.522, 10000, "ArI"),
    (8408.210, 15000, "ArI"),
    (8424.648, 20000, "ArI"),
    (8521.442, 15000, "ArI"),
    (8667.944, 4500, "ArI"),
)
_HE = (
    (3888.648, 500, "HeI"),
    (4026.191, 50, "HeI"),
    (4471.479, 200, "HeI"),
    (4713.146, 30, "HeI"),
    (4921.931, 50, "HeI"),
    (5015.678, 100, "HeI"),
    (5875.621, 500, "HeI"),
    (6678.152, 100, "HeI"),
    (7065.190, 200, "HeI"),
    (7281.349, 50, "HeI"),
)
_HG = (
    (3650.153, 9000, "HgI"),
    (4046.563, 12000, "HgI"),
    (4077.837, 1000, "HgI"),
    (4358.328, 12000, "HgI"),
    (5460.735, 6000, "HgI"),
    (5769.598, 1000, "HgI"),
    (5790.663, 1000, "HgI"),
)

LAMP_LINES: dict[str, tuple[tuple[float, int, str], ...]] = {
    "Ne": _NE,
    "Ar": _AR,
    "He": _HE,
    "Hg": _HG,
}

#: Balmer series, air (A): name -> wavelength.
BALMER_A = {
    "Ha": 6562.79,
    "Hb": 4861.35,
    "Hg": 4340.47,
    "Hd": 4101.74,
    "He": 3970.07,
    "H8": 3889.05,
    "H9": 3835.38,
}
#: Strong He I and He II lines of hot stars, air (A).
HELIUM_A = {
    "HeI 4026": 4026.19,
    "HeI 4471": 4471.48,
    "HeII 4686": 4685.70,
    "HeI 4922": 4921.93,
    "HeI 5016": 5015.68,
    "HeI 5876": 5875.62,
    "HeI 6678": 6678.15,
    "HeI 7065": 7065.19,
}
#: Telluric absorption bands (start, end) in A, air.
TELLURIC_BANDS_A = {
    "H2O": (6270.0, 6330.0),
    "O2 B": (6867.0, 6950.0),
    "H2O 7186": (7160.0, 7340.0),
    "O2 A": (7594.0, 7700.0),
    "H2O 8227": (8120.0, 8350.0),
}


def known_elements() -> tuple[str, ...]:
    """Element symbols with a shipped lamp line list."""
    return tuple(LAMP_LINES)


def lamp_lines(elements, *, wavelength_range_a=None, min_intensity=0):
    """
    Laboratory lines of one or several lamp elements, sorted by wavelength.

    Parameters
    ----------
    elements : str or sequence of str
        ``"Ne"``, ``["Ar", "Ne"]`` ... (case-insensitive; see `known_elements`).
    wavelength_range_a : (float, float), optional
        Keep lines inside this air-wavelength range (A).
    min_intensity : float, optional
        Keep lines with a NIST relative intensity at least this.

    Returns
    -------
    lines : list of (wavelength_a, intensity, spectrum)

    Raises
    ------
    ValueError
        An element has no shipped list.
    """
    if isinstance(elements, str):
        elements = [elements]
    by_lower = {k.lower(): k for k in LAMP_LINES}
    out = []
    for el in elements:
        key = by_lower.get(str(el).strip().lower())
        if key is None:
            msg = f"no line list for lamp element {el!r}; known: {', '.join(LAMP_LINES)}"
            raise ValueError(msg)
        out.extend(LAMP_LINES[key])
    if wavelength_range_a is not None:
        lo, hi = sorted(wavelength_range_a)
        out = [t for t in out if lo <= t[0] <= hi]
    out = [t for t in out if t[1] >= min_intensity]
    return sorted(set(out))
