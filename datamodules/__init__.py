"""LightningDataModules yielding the cloud partition, the device partition and the union test set."""

from datamodules.animal_shapes import AnimalShapesDataModule
from datamodules.arrays import ArrayDataModule
from datamodules.base import DCCCLDataModule, SplitData
from datamodules.cross_domain import CrossDomainDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import BundledMNISTDataModule
from datamodules.sklearn_digits import SklearnDigitsDataModule

__all__ = ["AnimalShapesDataModule", "ArrayDataModule", "BundledMNISTDataModule", "CrossDomainDataModule",
           "DCCCLDataModule", "ImageFolderDataModule", "SklearnDigitsDataModule", "SplitData"]
