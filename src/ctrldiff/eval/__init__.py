"""ctrldiff.eval"""
