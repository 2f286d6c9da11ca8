"""Measuring and fitting: sweeps of the bundled runner, their results files, calibration of the
step-time constants, and the reports that set predictions beside measurements."""
