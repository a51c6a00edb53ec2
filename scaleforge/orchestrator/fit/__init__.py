"""Fitting: the robust fitter, the law zoo, and the laws fitted to a plan's finished runs."""
