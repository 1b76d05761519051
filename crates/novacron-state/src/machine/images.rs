//! `apply` for base images.

use novacron_types::{ApiError, Image, ImageId};

use super::ClusterState;
use crate::command::Touched;

impl ClusterState {
    pub(super) fn create_image(&mut self, image: &Image) -> Result<Vec<Touched>, ApiError> {
        if self.images.contains_key(&image.id) {
            return Err(ApiError::conflict(format!(
                "image ID {} already exists",
                image.id
            )));
        }
        if self.image_by_name(&image.name).is_some() {
            return Err(ApiError::conflict(format!(
                "an image named '{}' already exists",
                image.name
            )));
        }
        self.images.insert(image.id, image.clone());
        Ok(vec![Touched::Image(image.id)])
    }

    pub(super) fn delete_image(&mut self, id: &ImageId) -> Result<Vec<Touched>, ApiError> {
        let image = self
            .images
            .get(id)
            .ok_or_else(|| ApiError::not_found("image", id))?;
        if let Some(vm) = self.vms.values().find(|v| v.spec.image == *id) {
            return Err(ApiError::conflict(format!(
                "image '{}' is used by VM '{}'",
                image.name, vm.name
            )));
        }
        self.images.remove(id);
        Ok(vec![Touched::Image(*id)])
    }
}
