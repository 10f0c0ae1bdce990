"""ctrldiff.algorithms"""
