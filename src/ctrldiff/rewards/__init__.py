"""ctrldiff.rewards"""
