//! `novacron image ...`: base images.

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;

use novacron_client::encode;
use novacron_types::{Image, ImageFormat, ImportImageRequest};

use super::common::{Global, client, follow, print_op};
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    List,
    /// Import a qcow2 or raw file (a path on the server's host) as a named image.
    Import {
        name: String,
        path: String,
        #[arg(long)]
        format: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    Delete {
        image: String,
    },
}

fn image_rows(images: &[Image]) -> Vec<Vec<String>> {
    images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.format.as_str().into(),
                format!("{} MiB", i.virtual_size / (1 << 20)),
                if i.boot.is_some() {
                    "kernel".into()
                } else {
                    "disk".into()
                },
                i.id.to_string(),
                i.description.clone(),
            ]
        })
        .collect()
}

pub(crate) async fn image(g: &Global, cmd: ImageCommand) -> anyhow::Result<()> {
    let c = client(g)?;
    match cmd {
        ImageCommand::List => {
            let images = c.list_images().await?;
            if g.output == Format::Json {
                return output::json(&images);
            }
            output::table(
                &["NAME", "FORMAT", "SIZE", "BOOT", "ID", "DESCRIPTION"],
                image_rows(&images),
            );
            Ok(())
        }
        ImageCommand::Import {
            name,
            path,
            format,
            description,
            no_wait,
        } => {
            let format = match format.as_deref() {
                None => None,
                Some("qcow2") => Some(ImageFormat::Qcow2),
                Some("raw") => Some(ImageFormat::Raw),
                Some(other) => bail!("--format must be qcow2 or raw (got '{other}')"),
            };
            let path = std::path::absolute(&path)
                .map(|p| p.display().to_string())
                .unwrap_or(path);
            let req = ImportImageRequest {
                name: name.clone(),
                source_path: path,
                format,
                description,
                boot: None,
            };
            let op = c.import_image(&req).await?;
            if no_wait {
                return print_op(&op, g);
            }
            follow(&c, op, Duration::from_secs(3600), g).await?;
            eprintln!("imported image {name}");
            Ok(())
        }
        ImageCommand::Delete { image } => {
            c.delete(&format!("/api/v1/images/{}", encode(&image)))
                .await?;
            eprintln!("deleted image {image}");
            Ok(())
        }
    }
}
