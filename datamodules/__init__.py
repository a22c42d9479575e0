"""LightningDataModules yielding the cloud partition, the device partition and the union test set."""

from datamodules.base import DCCCLDataModule, SplitData
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import BundledMNISTDataModule

__all__ = ["BundledMNISTDataModule", "DCCCLDataModule", "ImageFolderDataModule", "SplitData"]
