"""Parameter counts of every registered model at its preset size, for ``python -m covidx.train
--list-models`` (which then builds nothing and prints at once). ``tests/test_list_models.py`` builds each
model and checks its count here, so the table cannot drift from the code.
"""

PARAMETERS: dict[str, int] = {
    "baseline-densenet121": 7_041_604,
    "baseline-densenet169": 12_649_540,
    "baseline-efficientnetb0": 4_054_695,
    "baseline-mobilenetv2": 2_263_108,
    "baseline-resnet50": 23_595_908,
    "baseline-smallcnn": 295_188,
    "cascade-seme": 70_408_543,
    "densenet169-base": 12_799_682,
    "densenet169-gap": 12_639_938,
    "dpn131": 76_799_620,
    "dpn68": 11_847_050,
    "dpn92": 35_115_364,
    "dpn98": 59_057_380,
    "ensemble": 31_119_910,
    "fc-densenet103": 9_421_986,
    "lung-unet": 31_054_210,
    "mag-sd": 23_942_144,
    "moex-densenet169": 12_639_938,
    "moex-resnet50": 23_587_587,
    "resnet50-base": 23_882_499,
    "resnet50-gap": 23_587_587,
    "se-densenet169": 13_235_754,
    "se-dpn131": 82_379_844,
    "se-dpn68": 12_059_030,
    "se-dpn92": 39_496_596,
    "se-dpn98": 63_505_236,
    "se-resnet50": 26_118_579,
    "seme-densenet169": 13_235_754,
    "seme-resnet50": 26_118_579,
    "vgg19-base": 139_581_379,
    "vgg19-gap": 20_024_771,
}
