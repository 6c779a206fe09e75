"""The two base networks: ``mnistnet`` (conv32-conv64-fc128) and ``lrt-cnn`` (the LRT paper net)."""

from __future__ import annotations

from torch import nn

from edgetrain.models.registry import register_model


@register_model("mnistnet")
def mnistnet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """conv3x3(32)-BN-ReLU-maxpool, conv3x3(64)-BN-ReLU-maxpool, fc(128)-ReLU, fc(classes).

    Padding keeps the size through each conv, so any image_size divisible by 4 works (8x8 digits too).
    """
    if image_size % 4:
        raise ValueError(f"mnistnet needs an image size divisible by 4, got {image_size}")
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 128),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(128, num_classes),
    )


class LRTNet(nn.Module):
    """The LRT paper's CNN (Gural et al., v1 section 6).

    conv1 3x3 1->128 + ReLU; conv2 3x3 128->128 -> maxpool 2 -> ReLU -> BN; conv3 3x3 + ReLU;
    conv4 3x3 -> maxpool 2 -> ReLU -> BN; fc1 2048->512 + ReLU; fc2 512->10. All convs 'valid':
    28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4, so fc1 sees 128*4*4 = 2048 features. The paper trains
    the BN layers as streaming batch norm on the device (``edgetrain.adapt``).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 128, hidden: int = 512) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3)
        self.conv2 = nn.Conv2d(width, width, 3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3)
        self.conv4 = nn.Conv2d(width, width, 3)
        self.bn4 = nn.BatchNorm2d(width)
        self.fc1 = nn.Linear(width * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()

    def forward(self, x):  # noqa: ANN001, ANN201 - torch.fx traces this
        x = self.relu(self.conv1(x))
        x = self.bn2(self.relu(self.pool(self.conv2(x))))
        x = self.relu(self.conv3(x))
        x = self.bn4(self.relu(self.pool(self.conv4(x))))
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc2(x)


@register_model("lrt-cnn")
def lrt_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    if image_size != 28:
        raise ValueError(f"lrt-cnn is defined for 28x28 inputs (valid convolutions), got {image_size}")
    return LRTNet(num_classes=num_classes, in_channels=in_channels)
