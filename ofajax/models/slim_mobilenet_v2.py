TINY = {}
class SlimMobileNetV2: pass
