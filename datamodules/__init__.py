"""LightningDataModules yielding the cloud partition, the device partition and the union test set."""

from datamodules.arrays import ArrayDataModule
from datamodules.base import DCCCLDataModule, SplitData
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import BundledMNISTDataModule
from datamodules.sklearn_digits import SklearnDigitsDataModule

__all__ = ["ArrayDataModule", "BundledMNISTDataModule", "DCCCLDataModule", "ImageFolderDataModule",
           "SklearnDigitsDataModule", "SplitData"]
