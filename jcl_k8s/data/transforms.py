"""MoCo v2 augmentation, the k-crop view maker and the evaluation transforms.

All randomness comes from torch's global generator, which the dataset seeds
per sample, so a sample's views depend only on (seed, epoch, sample id) and
not on which worker, rank or world size produced them.
"""

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomGaussianBlur:
    """PIL Gaussian blur with sigma uniform in [low, high] (MoCo v2's blur)."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = self.low + (self.high - self.low) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def moco_v2_augmentation(image_size: int, min_crop_scale: float = 0.2) -> T.Compose:
    """The MoCo v2 augmentation; the blur sigma range [0.1, 2] is for 224 px
    images and is scaled by image_size / 224 so small images keep their content."""
    blur_scale = image_size / 224
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([RandomGaussianBlur(0.1 * blur_scale, 2.0 * blur_scale)], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class MultiCrop:
    """`k_crops` independent augmentations of one image, stacked (k x 3 x H x W)."""

    def __init__(self, augmentation: T.Compose, k_crops: int):
        self.augmentation = augmentation
        self.k_crops = k_crops

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.augmentation(image) for _ in range(self.k_crops)])


def linear_train_transform(image_size: int) -> T.Compose:
    """Linear classification training: RandomResizedCrop + flip."""
    return T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int) -> T.Compose:
    """Evaluation: resize to 256/224 of the crop, then centre crop (224 from 256)."""
    return T.Compose([
        T.Resize(round(image_size * 256 / 224)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
